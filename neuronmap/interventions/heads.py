"""Per-head statistics of attention: entropy, previous-token score, induction score, ablation importance.

- entropy: mean over query positions (from the second token on) of ``-sum_k p log p`` (nats) of the head's
  attention distribution; low = focused heads;
- previous-token score: mean attention from position q to q - 1;
- induction score (Olsson et al. 2022): on sequences of random tokens repeated twice, ``[r_1..r_n, r_1..r_n]``,
  the mean attention from each second-half position to the token *after* the previous occurrence of its own
  token (q -> q - n + 1). A head that does this completes patterns it has seen before;
- importance: the change of the loss on the second half of the repeated sequences (or of the metric on the
  given prompts) when the head is ablated (zero or mean).

Entropy and the previous-token score use the given prompts, or the repeated random sequences when none are
given; the induction score always uses the repeated sequences. A BOS token is put in front when the
tokenizer has one (attention sinks on it otherwise distort the first positions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ._common import (Batch, Metric, Progress, as_prompts, check_batch_size, check_stack, is_causal_lm, make_batch,
                      position_limit, prompt_batch)
from .ablation import Ablation
from .components import Component, head_site

_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.|$)")


@dataclass
class HeadResult:
    """Scores of every head of the chosen blocks: arrays of shape (n_layers, n_heads)."""

    layers: list[str]
    n_heads: int
    entropy: np.ndarray
    prev_token: np.ndarray
    induction: np.ndarray
    importance: np.ndarray | None
    importance_method: str | None
    metric: dict[str, Any]
    clean_metric: float | None
    source: str
    seq_len: int
    n_sequences: int

    def head_names(self) -> list[str]:
        return [f"{layer}.attn.heads.{h}" for layer in self.layers for h in range(self.n_heads)]

    def top(self, score: str, k: int = 5) -> list[dict[str, Any]]:
        """The `k` heads with the highest `score` (for importance: largest |effect|)."""
        values = getattr(self, score)
        if values is None:
            return []
        key = np.abs(values) if score == "importance" else values
        order = np.argsort(-np.nan_to_num(key.ravel(), nan=-np.inf), kind="stable")[:k]
        names = self.head_names()
        return [{"head": names[i], "value": float(values.ravel()[i])} for i in order]

    def summary(self) -> dict[str, Any]:
        scores = ["prev_token", "induction"] + (["importance"] if self.importance is not None else [])
        return {"layers": self.layers, "n_heads": self.n_heads, "source": self.source, "seq_len": self.seq_len,
                "n_sequences": self.n_sequences, "importance_method": self.importance_method, **self.metric,
                "clean_metric": self.clean_metric,
                "top": {s: self.top(s) for s in scores}, "most_focused": self.most_focused()}

    def most_focused(self, k: int = 5) -> list[dict[str, Any]]:
        """The `k` heads with the lowest attention entropy."""
        order = np.argsort(np.nan_to_num(self.entropy.ravel(), nan=np.inf), kind="stable")[:k]
        names = self.head_names()
        return [{"head": names[i], "value": float(self.entropy.ravel()[i])} for i in order]


def repeated_tokens(loaded: Any, seq_len: int, n_sequences: int, seed: int = 0,
                    prepend_bos: bool | None = None) -> tuple[Batch, int]:
    """``n_sequences`` rows of ``[bos?] r_1..r_n r_1..r_n`` (random non-special tokens, seeded) and the offset (0/1).

    Tokens of one row are distinct when the vocabulary allows, so each token's previous occurrence is unique.
    The batch's ``loss_mask`` counts the predictions of the second half's tokens after its first.
    """
    tokenizer = loaded.tokenizer
    vocab = min(len(tokenizer), int(getattr(loaded.model.config, "vocab_size", len(tokenizer)) or len(tokenizer)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    candidates = np.asarray([i for i in range(vocab) if i not in special])
    if len(candidates) < 2:
        raise ConfigError(f"the vocabulary of {loaded.name} has fewer than 2 ordinary tokens")
    bos = tokenizer.bos_token_id if prepend_bos is not False else None
    if prepend_bos and bos is None:
        raise ConfigError(f"prepend_bos=True but the tokenizer of {loaded.name} has no BOS token")
    offset = 1 if bos is not None else 0
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_sequences):
        half = rng.choice(candidates, size=seq_len, replace=seq_len > len(candidates)).tolist()
        rows.append(([bos] if offset else []) + half + half)
    batch = make_batch(loaded, rows)
    loss_mask = torch.zeros_like(batch.mask, dtype=torch.bool)
    loss_mask[:, offset + seq_len:offset + 2 * seq_len - 1] = True
    batch.loss_mask = loss_mask
    return batch, offset


class HeadStatistics:
    """Attention-head statistics of a model (patterns need eager attention; the adapter switches to it)."""

    def __init__(self, loaded: Any, batch_size: int = 16) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    def attribute(self, inputs: str | Sequence[str] | None = None, layers: str | Sequence[str] = "blocks.*",
                  seq_len: int = 20, n_sequences: int = 8, seed: int = 0, importance: str | None = None,
                  target: Any = None, prepend_bos: bool | None = None,
                  progress: Progress | None = None) -> HeadResult:
        """Scores of every head in the blocks of `layers`.

        Parameters
        ----------
        inputs : str or list of str, optional
            Prompts for entropy, previous-token score and importance; default the repeated random sequences.
        layers : str or list of str
            Blocks whose heads are scored (``blocks.*``, ``blocks.0-3``; attn/mlp names count as their block).
        seq_len, n_sequences, seed : int
            Shape and seed of the repeated random sequences (total length ``2 * seq_len`` (+ BOS)).
        importance : None | "zero" | "mean"
            Also ablate each head and report the change of the metric.
        target : None | (answer, wrong) | answer
            Metric of the importance on `inputs` (default next-token loss); the repeated sequences always use
            the loss of their second half.
        """
        check_stack(self.loaded, "head statistics")
        check_batch_size(self.batch_size)
        for name, value, low in (("seq_len", seq_len, 2), ("n_sequences", n_sequences, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if importance not in (None, "zero", "mean"):
            raise ConfigError(f"importance={importance!r} must be 'zero', 'mean' or None (no ablation)")
        if importance and inputs is None and not is_causal_lm(self.loaded):
            raise ConfigError(f"model {self.loaded.name} is not a next-token model, so the loss on repeated random "
                              "tokens that head importance uses does not exist: pass prompts and target=(answer, "
                              "wrong) (--prompts with --answer/--wrong), or importance=None (--importance none)")
        blocks = self._blocks(layers)
        sites = [head_site(self.loaded.adapter, f"blocks.{b}.attn") for b in blocks]
        n_heads = sites[0].n_heads
        limit = position_limit(self.loaded)
        if limit and 2 * seq_len + 1 > limit:
            raise ConfigError(f"seq_len={seq_len}: the repeated sequence (2 x {seq_len} + BOS) exceeds the model's "
                              f"{limit} positions; use seq_len <= {(limit - 1) // 2}")
        repeated, offset = repeated_tokens(self.loaded, seq_len, n_sequences, seed, prepend_bos)
        prompts = prompt_batch(self.loaded, as_prompts(inputs)) if inputs is not None else None
        stats_batch = prompts if prompts is not None else repeated
        steps = 2 + (1 if importance else 0)
        entropy, prev, _ = self._pattern_scores(blocks, n_heads, stats_batch, None)
        if progress is not None:
            progress(1, steps)
        _, _, induction = self._pattern_scores(blocks, n_heads, repeated, (offset, seq_len))
        if progress is not None:
            progress(2, steps)
        effect, clean, metric = None, None, {}
        if importance:
            components = [Component(f"blocks.{b}.attn.heads.{h}", "head", site.ref, (h, site.head_dim))
                          for b, site in zip(blocks, sites) for h in range(n_heads)]
            if prompts is not None:
                scorer, batch = Metric.from_target(self.loaded, target), prompts
            else:
                scorer, batch = Metric.from_target(self.loaded, None), repeated
            result = Ablation(self.loaded, self.batch_size).ablate_batch(batch, components, scorer, importance, None)
            effect, clean, metric = result.effect.reshape(len(blocks), n_heads), result.clean, result.metric
            if progress is not None:
                progress(3, steps)
        return HeadResult([f"blocks.{b}" for b in blocks], n_heads, entropy, prev, induction, effect, importance,
                          metric, clean, "prompts" if prompts is not None else "repeated random tokens", seq_len,
                          n_sequences)

    def _blocks(self, layers: str | Sequence[str]) -> list[int]:
        refs = self.loaded.adapter.resolve(layers)
        blocks = sorted({int(m.group(1)) for m in (_BLOCK.match(r.name) for r in refs) if m})
        if not blocks:
            raise ConfigError(f"layers={layers!r} names no block: head statistics need blocks.N (e.g. blocks.*)")
        return blocks

    def _pattern_scores(self, blocks: list[int], n_heads: int, batch: Batch,
                        induction: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean entropy, previous-token and (with `(offset, n)`) induction attention per (block, head)."""
        adapter = self.loaded.adapter
        refs = adapter.resolve([f"blocks.{b}.attn.pattern" for b in blocks])
        shape = (len(blocks), n_heads)
        ent_sum, prev_sum, ind_sum = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        ent_n = prev_n = ind_n = 0
        for start in range(0, len(batch), self.batch_size):
            chunk = batch.rows(range(start, min(start + self.batch_size, len(batch))))
            with torch.no_grad(), Capture(refs) as capture:
                capture.run(adapter.forward, chunk.ids, chunk.mask, refs)
            mask = chunk.mask.bool()
            seq = mask.shape[1]
            queries = mask.clone()
            queries[:, 0] = False  # the first query can only attend to itself in a causal model
            q_idx = torch.arange(1, seq)
            for i, ref in enumerate(refs):
                p = capture.outputs[ref.name].double().cpu()  # (batch, heads, q, k)
                plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
                ent = -plogp.sum(-1)  # (batch, heads, q)
                ent_sum[i] += (ent * queries[:, None]).sum((0, 2)).numpy()
                prev = p[:, :, q_idx, q_idx - 1]  # (batch, heads, seq - 1)
                prev_sum[i] += (prev * queries[:, None, 1:]).sum((0, 2)).numpy()
                if induction is not None:
                    offset, n = induction
                    q = torch.arange(offset + n, offset + 2 * n)
                    ind_sum[i] += p[:, :, q, q - n + 1].sum((0, 2)).numpy()
            ent_n += int(queries.sum())
            prev_n += int(queries[:, 1:].sum())
            if induction is not None:
                ind_n += len(chunk) * induction[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return ent_sum / ent_n, prev_sum / prev_n, (ind_sum / ind_n if ind_n else np.full(shape, np.nan))
