"""Counterfactual prompt pairs: how much each layer's state and the next-token distribution move.

Change one thing in a prompt ("The keys ... is" -> "The keys ... are", France -> Italy) and compare the two
forwards: per layer, the L2 norm of the difference of the states at the last token (relative to the
original's norm, and their cosine), per position when both prompts have the same token length, and at the
output the tokens whose next-token probability changed most plus the KL divergence between the two
distributions. Several pairs are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ._common import (Progress, as_prompts, check_stack, hidden_refs, make_batch, run_logits, tokenize)


@dataclass
class CounterfactualResult:
    """Activation and logit changes between prompts and their counterfactuals.

    norms, relative, cosine : ndarray of shape (n_pairs, n_layers)
        At the last token: ``||h' - h||``, ``||h' - h|| / ||h||`` and ``cos(h, h')`` per pair and layer.
    position_norms : ndarray of shape (n_layers, n_positions) or None
        ``||h'_p - h_p||`` per position, mean over pairs; only when every pair has one shared token length.
    kl : ndarray of shape (n_pairs,)
        ``KL(p || p')`` of the next-token distributions at the last token (nats).
    top_changed : list of dict
        The `top_k` tokens with the largest mean |p' - p| (token, id, prob, counterfactual_prob, delta_prob,
        delta_logit; means over pairs).
    """

    layers: list[str]
    inputs: list[str]
    baselines: list[str]
    norms: np.ndarray
    relative: np.ndarray
    cosine: np.ndarray
    position_norms: np.ndarray | None
    kl: np.ndarray
    top1: list[tuple[str, str]]
    top_changed: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        mean_rel = self.relative.mean(axis=0)
        return {"layers": self.layers, "n_pairs": len(self.inputs), "pairs": [
            {"input": a, "counterfactual": b, "top1": t[0], "counterfactual_top1": t[1], "kl": float(k)}
            for a, b, t, k in zip(self.inputs, self.baselines, self.top1, self.kl)],
            "mean_norm": self.norms.mean(axis=0).tolist(), "mean_relative": mean_rel.tolist(),
            "mean_cosine": self.cosine.mean(axis=0).tolist(), "mean_kl": float(self.kl.mean()),
            "aligned": self.position_norms is not None,
            "most_changed_layer": self.layers[int(np.argmax(mean_rel))], "top_changed": self.top_changed}


class Counterfactual:
    """Compare prompts with their counterfactuals on a model loaded with ``load_model(..., head=True)``."""

    def __init__(self, loaded: Any, batch_size: int = 16) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    def attribute(self, inputs: str | Sequence[str], baselines: str | Sequence[str],
                  layers: str | Sequence[str] = "blocks.*", top_k: int = 10,
                  progress: Progress | None = None) -> CounterfactualResult:
        """Per-layer state changes and next-token changes from each input to its counterfactual.

        Parameters
        ----------
        inputs : str or list of str
            Original prompts.
        baselines : str or list of str
            Their counterfactuals, one per input (same order).
        layers : str or list of str
            Hidden layers compared (``blocks.*``, ``blocks.*.mlp``, ...).
        top_k : int
            Changed tokens reported.
        """
        check_stack(self.loaded, "counterfactual comparison")
        originals, counterfactuals = as_prompts(inputs), as_prompts(baselines, "baselines")
        if len(originals) != len(counterfactuals):
            raise ConfigError(f"{len(originals)} inputs but {len(counterfactuals)} counterfactual baselines: give one "
                              "counterfactual per input")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k={top_k!r} must be an integer >= 1")
        refs = hidden_refs(self.loaded, layers, "counterfactual comparison")
        ids_a = [tokenize(self.loaded, p) for p in originals]
        ids_b = [tokenize(self.loaded, p) for p in counterfactuals]
        lengths = {len(i) for i in ids_a + ids_b}
        aligned = len(lengths) == 1
        n_pairs, n_layers = len(originals), len(refs)
        norms, relative, cosine = (np.empty((n_pairs, n_layers)) for _ in range(3))
        position_sum = np.zeros((n_layers, lengths.pop())) if aligned else None
        kl = np.empty(n_pairs)
        delta_p = delta_logit = p_sum = q_sum = None
        top1 = []
        for pair in range(n_pairs):
            states_a, logits_a = self._forward(refs, ids_a[pair])
            states_b, logits_b = self._forward(refs, ids_b[pair])
            for i, ref in enumerate(refs):
                a, b = states_a[ref.name], states_b[ref.name]  # (seq, d)
                diff = b[-1] - a[-1]
                norms[pair, i] = float(diff.norm())
                relative[pair, i] = norms[pair, i] / max(float(a[-1].norm()), 1e-12)
                cosine[pair, i] = float(torch.nn.functional.cosine_similarity(a[-1], b[-1], dim=0))
                if aligned:
                    position_sum[i] += (b - a).norm(dim=-1).numpy()
            p, q = torch.softmax(logits_a, -1), torch.softmax(logits_b, -1)
            kl[pair] = float((p * (torch.log_softmax(logits_a, -1) - torch.log_softmax(logits_b, -1))).sum())
            delta_p = (q - p) if delta_p is None else delta_p + (q - p)
            delta_logit = (logits_b - logits_a) if delta_logit is None else delta_logit + (logits_b - logits_a)
            p_sum, q_sum = (p, q) if p_sum is None else (p_sum + p, q_sum + q)
            tokens = self.loaded.tokenizer.convert_ids_to_tokens
            top1.append((tokens(int(p.argmax())), tokens(int(q.argmax()))))
            if progress is not None:
                progress(pair + 1, n_pairs)
        mean_dp = delta_p / n_pairs
        order = torch.topk(mean_dp.abs(), min(top_k, mean_dp.numel())).indices.tolist()
        tokens = self.loaded.tokenizer.convert_ids_to_tokens
        top_changed = [{"token": tokens(t), "id": t, "prob": float(p_sum[t] / n_pairs),
                        "counterfactual_prob": float(q_sum[t] / n_pairs), "delta_prob": float(mean_dp[t]),
                        "delta_logit": float(delta_logit[t] / n_pairs)} for t in order]
        return CounterfactualResult([r.name for r in refs], originals, counterfactuals, norms, relative, cosine,
                                    None if position_sum is None else position_sum / n_pairs, kl, top1, top_changed)

    def _forward(self, refs: list, ids: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = make_batch(self.loaded, [ids])
        with torch.no_grad(), Capture(refs) as capture:
            logits = capture.run(run_logits, self.loaded, batch)
        states = {name: value[0].reshape(value.shape[1], -1).double().cpu() for name, value in capture.outputs.items()}
        return states, logits[0, -1].double().cpu()
