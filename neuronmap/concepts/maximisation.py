"""Activation maximisation with soft prompts: the input that drives one neuron hardest.

Token ids are discrete, so the optimised input is a sequence of input *embeddings* (a soft prompt) fed
through ``inputs_embeds``: position embeddings, masks and every block are the model's own. Adam
(seeded start: the embeddings of random tokens) maximises the neuron's activation at one position,
minus an optional L2 penalty; after every step each position's vector is projected back into the
range of norms the vocabulary's embeddings have, so the optimiser cannot win by inflating norms the
model never saw. The best soft prompt over all steps is kept and its activation recomputed by a plain
forward.

A soft prompt is not text. To read it, each position is projected to its nearest vocabulary tokens by
cosine similarity; the activation of that hard prompt is reported beside the soft one (usually far
lower: the gap says how much the optimum depends on directions no token has), and so is the
activation of random token prompts of the same length (the baseline the optimum must beat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ..interventions._common import check_stack, device_of, hidden_refs

Progress = Callable[[int, int], None]
MAX_RANDOM = 10_000
"""Most random prompts of the baseline: a few hundred already pin down its best and mean value."""


def position_limit(model: Any) -> int | None:
    """Token positions `model` has (``max_position_embeddings`` / ``n_positions``), None when unbounded
    (relative positions, e.g. T5). RoBERTa-style models number positions from ``pad_token_id + 1``."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return None
    if "roberta" in str(getattr(config, "model_type", "")) or getattr(config, "model_type", "") == "camembert":
        limit -= int(getattr(config, "pad_token_id", None) or 0) + 1
    return int(limit)


def parse_neuron(loaded: Any, spec: str) -> tuple[Any, int]:
    """``"blocks.3.mlp:17"`` -> (LayerRef, 17); unknown layers raise UnknownLayerError listing the names."""
    text = str(spec).strip()
    layer, sep, unit = text.rpartition(":")
    if not sep or not layer:
        raise ConfigError(f"neuron {text!r} must be LAYER:INDEX, e.g. blocks.3.mlp:17")
    try:
        index = int(unit)
    except ValueError:
        raise ConfigError(f"neuron {text!r}: {unit!r} must be an integer index") from None
    if index < 0:
        raise ConfigError(f"neuron {text!r}: index {index} must be >= 0")
    refs = hidden_refs(loaded, layer, "maximize")
    if len(refs) != 1:
        raise ConfigError(f"neuron {text!r}: {layer!r} names {len(refs)} layers; name exactly one, e.g. blocks.3.mlp")
    return refs[0], index


@dataclass
class MaximisationResult:
    """A soft prompt maximising one neuron, its nearest tokens, and the baselines.

    embeddings : (length, d) the best soft prompt; activation : the neuron on it (a plain forward)
    history : (steps + 1,) the activation before each update (the last entry: after the last update)
    nearest_ids, nearest_cosine : (length, n_nearest) closest vocabulary tokens per position
    hard_ids : (length,) the closest token per position; hard_activation : the neuron on them
    random_activations : (n_random,) the neuron on random token prompts of the same length
    """

    neuron: str
    layer: str
    unit: int
    position: int | str
    length: int
    embeddings: np.ndarray
    activation: float
    history: np.ndarray
    best_step: int
    nearest_ids: np.ndarray
    nearest_tokens: list[list[str]]
    nearest_cosine: np.ndarray
    hard_ids: list[int]
    hard_text: str
    hard_activation: float
    random_activations: np.ndarray
    start_activation: float
    norm_range: tuple[float, float]
    params: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        best_random = float(self.random_activations.max()) if len(self.random_activations) else None
        return {"neuron": self.neuron, "layer": self.layer, "unit": self.unit, "position": self.position,
                "length": self.length, "activation": self.activation, "start_activation": self.start_activation,
                "best_step": self.best_step, "hard_prompt": self.hard_text, "hard_ids": self.hard_ids,
                "hard_tokens": [tokens[0] for tokens in self.nearest_tokens], "hard_activation": self.hard_activation,
                "random_best": best_random,
                "random_mean": float(self.random_activations.mean()) if len(self.random_activations) else None,
                "n_random": int(len(self.random_activations)),
                "beats_random": None if best_random is None else bool(self.activation > best_random),
                "norm_range": list(self.norm_range),
                "nearest": [[{"token": t, "id": int(i), "cosine": float(c)} for t, i, c in zip(tokens, ids, cos)]
                            for tokens, ids, cos in zip(self.nearest_tokens, self.nearest_ids, self.nearest_cosine)],
                "layers": [self.layer]}


class ActivationMaximisation:
    """Optimise soft prompts for neurons of `loaded` (a `LoadedModel`; decoder-only or encoder model)."""

    def __init__(self, loaded: Any, batch_size: int = 32) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        check_stack(loaded, "maximize")
        self.loaded = loaded
        self.model = loaded.model
        self.batch_size = batch_size

    # -- the neuron as a function of input embeddings --------------------------------------------------
    def activation(self, embeddings: torch.Tensor, ref: Any, unit: int, position: int | str) -> torch.Tensor:
        """The neuron for each row of `embeddings` (batch, length, d): (batch,). Grad mode is the caller's."""
        mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
        with Capture([ref], stop_early=True, detach=False) as cap:
            cap.run(self.model, inputs_embeds=embeddings, attention_mask=mask)
        return self._read(cap.outputs[ref.name], ref, unit, position)

    def activation_of_ids(self, ids: torch.Tensor, ref: Any, unit: int, position: int | str) -> torch.Tensor:
        """The neuron for token prompts `ids` (batch, length), no special tokens added: (batch,)."""
        mask = torch.ones_like(ids)
        with torch.no_grad(), Capture([ref], stop_early=True) as cap:
            cap.run(self.model, input_ids=ids, attention_mask=mask)
        # A copy: the read is a view that would keep the layer's whole (batch, tokens, units) output alive.
        return self._read(cap.outputs[ref.name], ref, unit, position).clone()

    @staticmethod
    def _read(hidden: torch.Tensor, ref: Any, unit: int, position: int | str) -> torch.Tensor:
        if hidden.dim() != 3:
            raise ConfigError(f"{ref.name} gives shape {tuple(hidden.shape)}, not (batch, tokens, units): pick a block, "
                              "attn or mlp layer")
        if unit >= hidden.shape[-1]:
            raise ConfigError(f"neuron {ref.name}:{unit} is out of range: {ref.name} has {hidden.shape[-1]} units "
                              f"(0..{hidden.shape[-1] - 1})")
        values = hidden[..., unit].float()
        return values.mean(dim=1) if position == "mean" else values[:, position]

    def check(self, neuron: str, length: int = 8, steps: int = 200, lr: float = 0.1, l2: float = 0.0,
              position: int | str = -1, n_nearest: int = 5, n_random: int = 64) -> tuple[Any, int, int | str]:
        """Validate `maximize`'s options before any work: (layer ref, unit, position); ConfigError otherwise."""
        for name, value, low in (("length", length, 1), ("steps", steps, 0), ("n_nearest", n_nearest, 1),
                                 ("n_random", n_random, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if n_random > MAX_RANDOM:
            raise ConfigError(f"n_random={n_random} must be <= {MAX_RANDOM} (random prompts of the baseline, --random; "
                              "a few hundred already give its best and mean)")
        limit = position_limit(self.model)
        if limit is not None and length > limit:
            raise ConfigError(f"length={length} is more than the {limit} positions the model has: use --length {limit} "
                              "or less")
        if not lr > 0:
            raise ConfigError(f"lr={lr!r} must be > 0")
        if not l2 >= 0:
            raise ConfigError(f"l2={l2!r} must be >= 0")
        if position != "mean" and (isinstance(position, bool) or not isinstance(position, (int, np.integer))
                                   or not -length <= int(position) < length):
            raise ConfigError(f"position={position!r} must be mean or an integer in [{-length}, {length - 1}] "
                              f"(the soft prompt has {length} positions)")
        position = position if position == "mean" else int(position)
        ref, unit = parse_neuron(self.loaded, neuron)
        return ref, unit, position

    # -- the verb ---------------------------------------------------------------------------------------
    def maximize(self, neuron: str, length: int = 8, steps: int = 200, lr: float = 0.1, l2: float = 0.0,
                 position: int | str = -1, seed: int = 0, n_nearest: int = 5, n_random: int = 64,
                 progress: Progress | None = None) -> MaximisationResult:
        """Optimise a soft prompt of `length` positions for `neuron` (``LAYER:INDEX``).

        Parameters
        ----------
        neuron : str
            ``blocks.3.mlp:17``: a canonical (or ``module:``) layer and a unit of its output.
        length, steps : int
            Soft-prompt positions, Adam steps.
        lr : float
            Adam's step size as a fraction of the median embedding norm (each step moves every
            coordinate by about ``lr * median_norm / sqrt(d)``), so one value suits models of any width.
        l2 : float
            Penalty on the mean squared norm of the positions (0: only the norm projection).
        position : int or "mean"
            Which position's activation is maximised (-1: the last, which sees every position in a
            causal model), or the mean over positions.
        seed : int
            Seeds the starting tokens and the random baseline prompts.
        n_nearest : int
            Vocabulary tokens reported per position.
        n_random : int
            Random token prompts of the same length whose activations are the baseline (0: none).
        """
        ref, unit, position = self.check(neuron, length, steps, lr, l2, position, n_nearest, n_random)
        table = self.model.get_input_embeddings().weight.detach()
        device = device_of(self.model)
        norms = table.float().norm(dim=-1)
        low, high = float(norms.min()), float(norms.max())
        candidates = self._candidate_ids(table.shape[0])
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        start_ids = candidates[torch.randint(len(candidates), (length,), generator=generator)]
        soft = table[start_ids.to(table.device)].float().clone().to(device).requires_grad_(True)
        step_size = lr * float(norms.median()) / float(np.sqrt(table.shape[1]))  # lr in units of a typical norm
        optimizer = torch.optim.Adam([soft], lr=step_size)
        dtype = table.dtype
        history = []
        best, best_value, best_step = soft.detach().clone(), -float("inf"), 0
        for step in range(steps + 1):
            with torch.enable_grad():
                value = self.activation(soft.to(dtype)[None], ref, unit, position)[0]
            current = float(value.detach())
            history.append(current)
            if current > best_value:
                best, best_value, best_step = soft.detach().clone(), current, step
            if step == steps:
                break
            objective = value - l2 * soft.pow(2).sum(dim=-1).mean()
            (soft.grad,) = torch.autograd.grad(-objective, [soft])  # the model's own .grad stay untouched
            optimizer.step()
            with torch.no_grad():
                size = soft.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                soft.mul_(size.clamp(low, high) / size)
            if progress is not None:
                progress(step + 1, steps)
        with torch.no_grad():
            activation = float(self.activation(best.to(dtype)[None], ref, unit, position)[0])
            unit_best = torch.nn.functional.normalize(best.float(), dim=-1)
            unit_table = torch.nn.functional.normalize(table.float().to(device), dim=-1)
            cosine = unit_best @ unit_table.T
            top = cosine.topk(min(n_nearest, table.shape[0]), dim=-1)
            nearest_ids = top.indices.cpu().numpy()
            hard = top.indices[:, 0]
            hard_activation = float(self.activation_of_ids(hard[None].to(device), ref, unit, position)[0])
            random_values = self._random_baseline(candidates, length, n_random, ref, unit, position, generator)
        tokenizer = self.loaded.tokenizer
        params = {"neuron": neuron, "length": length, "steps": steps, "lr": lr, "l2": l2, "position": position,
                  "seed": seed, "n_nearest": n_nearest, "n_random": n_random}
        return MaximisationResult(
            neuron=f"{ref.name}:{unit}", layer=ref.name, unit=unit, position=position, length=length,
            embeddings=best.cpu().numpy(), activation=activation, history=np.asarray(history), best_step=best_step,
            nearest_ids=nearest_ids, nearest_tokens=[tokenizer.convert_ids_to_tokens(row.tolist()) for row in nearest_ids],
            nearest_cosine=top.values.cpu().numpy(), hard_ids=hard.cpu().tolist(),
            hard_text=tokenizer.decode(hard.cpu().tolist()), hard_activation=hard_activation,
            random_activations=random_values, start_activation=history[0], norm_range=(low, high), params=params)

    def _candidate_ids(self, vocab: int) -> torch.Tensor:
        """Token ids for starts and random baselines: the vocabulary without special tokens."""
        special = set(self.loaded.tokenizer.all_special_ids)
        ids = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
        if not len(ids):
            raise ConfigError("the vocabulary has only special tokens")
        return ids

    def _random_baseline(self, candidates: torch.Tensor, length: int, n_random: int, ref: Any, unit: int,
                         position: int | str, generator: torch.Generator) -> np.ndarray:
        if n_random == 0:
            return np.empty(0)
        device = device_of(self.model)
        values = []
        for start in range(0, n_random, self.batch_size):  # drawn batch by batch: the same ids as one draw
            rows = min(self.batch_size, n_random - start)
            ids = candidates[torch.randint(len(candidates), (rows, length), generator=generator)]
            values.append(self.activation_of_ids(ids.to(device), ref, unit, position))
        return torch.cat(values).cpu().numpy().astype(np.float64)
