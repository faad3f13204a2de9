"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Corrupt a prompt by adding Gaussian noise to the input embeddings of its subject tokens, then restore
one clean hidden state at a time (a layer at a position) and measure how much of the clean probability of
the correct next token comes back. A state whose restoration brings the answer back carries what the
noise destroyed; the per-layer x per-position map shows where the fact is recalled.

- noise: ``noise`` x the standard deviation of the token-embedding matrix (3 by default, as in the paper),
  drawn once from a seeded generator as ``randn(samples, n_subject_tokens, d)`` and reused for every
  restoration (so cells are comparable);
- `layers` picks what is restored: ``blocks.*`` (residual stream), ``blocks.*.mlp`` (MLP outputs),
  ``blocks.*.attn`` (attention outputs); ``window`` restores that many consecutive layers around each one
  (the paper uses 10 for MLP and attention);
- indirect effect = ``p(restored) - p(corrupted)``, averaged over the noise samples.

Needs logits: ``load_model(..., head=True)``. The probability is read at the last token.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ._common import (Progress, check_batch_size, check_stack, edit_activation, hidden_refs, make_batch, run_logits,
                      token_id, tokenize)

DEFAULT_NOISE = 3.0


@dataclass
class TracingResult:
    """Causal tracing of one prompt.

    probs : ndarray of shape (n_layers, n_positions)
        Probability of `answer` at the last token with the state of `layers[i]` (and its window) at position j
        restored, mean over noise samples (one column when every position was restored at once).
    effect : ndarray of shape (n_layers, n_positions)
        Indirect effect ``probs - corrupted_prob``.
    """

    layers: list[str]
    tokens: list[str]
    subject: tuple[int, int]
    answer: int
    answer_token: str
    clean_prob: float
    corrupted_prob: float
    probs: np.ndarray
    noise_std: float
    samples: int
    window: int
    positions: str
    effect: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.effect = self.probs - self.corrupted_prob

    def summary(self) -> dict[str, Any]:
        best = np.unravel_index(int(np.argmax(self.effect)), self.effect.shape)
        return {"layers": self.layers, "tokens": self.tokens, "subject": list(self.subject), "answer": self.answer,
                "answer_token": self.answer_token, "clean_prob": self.clean_prob,
                "corrupted_prob": self.corrupted_prob, "noise_std": self.noise_std, "samples": self.samples,
                "window": self.window, "positions": self.positions, "shape": list(self.probs.shape),
                "max_effect": {"layer": self.layers[best[0]], "position": int(best[1]),
                               "prob": float(self.probs[best]), "effect": float(self.effect[best])}}


class CausalTracing:
    """Causal tracing on a model loaded with ``load_model(..., head=True)``.

    Parameters
    ----------
    loaded : LoadedModel
    batch_size : int
        Rows per forward (each restoration runs `samples` rows).
    """

    def __init__(self, loaded: Any, batch_size: int = 64) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    def attribute(self, inputs: str, subject: str | tuple[int, int], target: str | int | None = None,
                  layers: str | Sequence[str] = "blocks.*", noise: float = DEFAULT_NOISE, samples: int = 10,
                  seed: int = 0, window: int = 1, positions: str = "each",
                  progress: Progress | None = None) -> TracingResult:
        """Noise the subject, restore states layer by position.

        Parameters
        ----------
        inputs : str
            The prompt (e.g. "The Eiffel Tower is located in the city of").
        subject : str or (start, end)
            The subject: a substring of the prompt (its last occurrence; every token overlapping it is noised)
            or a token range [start, end).
        target : str or int, optional
            The correct next token (one token); default the clean model's most likely next token.
        layers : str or list of str
            What is restored (one heatmap row each): ``blocks.*``, ``blocks.*.mlp``, ``blocks.*.attn``, ranges.
        noise : float
            Noise scale in multiples of the token-embedding standard deviation; 0 gives the clean run.
        samples : int
            Noise draws averaged per cell.
        seed : int
            Seed of the noise.
        window : int
            Consecutive layers (of `layers`, centred on each row) restored together.
        positions : "each" | "all"
            One column per token, or one column restoring every position at once.
        """
        check_stack(self.loaded, "causal tracing")
        batch_size = check_batch_size(self.batch_size)
        if not isinstance(inputs, str) or not inputs.strip():
            raise ConfigError(f"prompt {inputs!r} must be a non-empty string")
        if positions not in ("each", "all"):
            raise ConfigError(f"positions={positions!r} must be one of each, all")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"samples={samples!r} must be an integer >= 1")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window={window!r} must be an integer >= 1")
        if not isinstance(noise, (int, float)) or not np.isfinite(noise) or noise < 0:
            raise ConfigError(f"noise={noise!r} must be a number >= 0 (multiples of the embedding std)")
        ids = tokenize(self.loaded, inputs)
        start, end = self._subject_span(inputs, subject, len(ids))
        refs = hidden_refs(self.loaded, layers, "causal tracing")
        batch = make_batch(self.loaded, [ids])
        n = len(ids)

        with torch.no_grad(), Capture(refs) as capture:
            clean_logits = capture.run(run_logits, self.loaded, batch)
            clean_states = {name: value[0] for name, value in capture.outputs.items()}  # (seq, *feature)
        clean_probs = torch.softmax(clean_logits[0, -1], dim=-1)
        answer = int(torch.argmax(clean_probs)) if target is None else token_id(self.loaded, target, "target")
        embeddings = self.loaded.model.get_input_embeddings()
        std = float(embeddings.weight.detach().float().std())
        generator = torch.Generator().manual_seed(int(seed))
        draws = torch.randn((samples, end - start, embeddings.weight.shape[1]), generator=generator)
        scale = float(noise) * std

        columns = [list(range(n))] if positions == "all" else [[p] for p in range(n)]
        configs = [(i, column) for i in range(len(refs)) for column in columns]
        per_batch = max(1, batch_size // samples)
        probs = np.empty(len(configs))
        with torch.no_grad():
            corrupted = self._noised_probs(batch.repeat(samples), draws * scale, start, end, answer, samples, [], refs,
                                           clean_states, window)
            for first in range(0, len(configs), per_batch):
                chunk = configs[first:first + per_batch]
                probs[first:first + len(chunk)] = self._noised_probs(
                    batch.repeat(samples * len(chunk)), (draws * scale).repeat(len(chunk), 1, 1), start, end, answer,
                    samples, chunk, refs, clean_states, window)
                if progress is not None:
                    progress(min(first + per_batch, len(configs)), len(configs))
        tokenizer = self.loaded.tokenizer
        return TracingResult(
            layers=[ref.name for ref in refs], tokens=tokenizer.convert_ids_to_tokens(ids), subject=(start, end),
            answer=answer, answer_token=tokenizer.convert_ids_to_tokens(answer),
            clean_prob=float(clean_probs[answer]), corrupted_prob=float(corrupted[0]),
            probs=probs.reshape(len(refs), len(columns)), noise_std=scale, samples=samples, window=window,
            positions=positions)

    # -- pieces ------------------------------------------------------------------------------------------
    def _noised_probs(self, batch, noise: torch.Tensor, start: int, end: int, answer: int, samples: int,
                      configs: list[tuple[int, list[int]]], refs: list, clean_states: dict, window: int) -> np.ndarray:
        """Mean p(answer) per config (or one value without configs) over its `samples` noised rows."""
        restore: dict[int, tuple[list[int], list[int]]] = {}
        for c, (layer, column) in enumerate(configs):
            lo = max(0, min(layer - window // 2, len(refs) - window))
            for k in range(lo, min(len(refs), lo + window)):
                rows, cols = restore.setdefault(k, ([], []))
                for row in range(c * samples, (c + 1) * samples):
                    rows.extend([row] * len(column))
                    cols.extend(column)
        with ExitStack() as stack:
            stack.enter_context(_add_noise(self.loaded.model.get_input_embeddings(), noise, start, end))
            for k, (rows, cols) in restore.items():
                ref = refs[k]
                stack.enter_context(edit_activation(ref, _restorer(clean_states[ref.name], rows, cols)))
            logits = run_logits(self.loaded, batch)
        p = torch.softmax(logits[:, -1], dim=-1)[:, answer].double().cpu().numpy()
        return p.reshape(-1, samples).mean(axis=1)

    def _subject_span(self, prompt: str, subject: Any, n_tokens: int) -> tuple[int, int]:
        if isinstance(subject, (tuple, list)) and len(subject) == 2 and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in subject):
            start, end = int(subject[0]), int(subject[1])
            if not 0 <= start < end <= n_tokens:
                raise ConfigError(f"subject token range {subject!r} must satisfy 0 <= start < end <= {n_tokens}")
            return start, end
        if not isinstance(subject, str) or not subject.strip():
            raise ConfigError(f"subject={subject!r} must be a substring of the prompt or a token range (start, end)")
        at = prompt.rfind(subject)
        if at < 0:
            raise ConfigError(f"subject {subject!r} does not occur in the prompt {prompt!r}: give a substring of it")
        encoded = self.loaded.tokenizer(prompt, return_offsets_mapping=True)
        hit = [i for i, (a, b) in enumerate(encoded["offset_mapping"])
               if b > a and a < at + len(subject) and b > at]
        if not hit:
            raise ConfigError(f"subject {subject!r} covers no token of the prompt")
        return hit[0], hit[-1] + 1


@contextmanager
def _add_noise(embeddings: torch.nn.Module, noise: torch.Tensor, start: int, end: int) -> Iterator[None]:
    """Add `noise` (rows, end - start, d) to the token embeddings of positions [start, end)."""
    def hook(_module, _args, output):
        out = output.clone()
        out[:, start:end] += noise.to(out.device, out.dtype)
        return out

    handle = embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _restorer(clean: torch.Tensor, rows: list[int], cols: list[int]):
    rows_t, cols_t = torch.as_tensor(rows), torch.as_tensor(cols)

    def restore(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        out[rows_t.to(out.device), cols_t.to(out.device)] = clean[cols_t.to(clean.device)].to(out.device, out.dtype)
        return out

    return restore
