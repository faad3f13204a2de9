"""Activation steering: add ``alpha * direction`` to a layer's output at every position while generating.

Turner et al.'s activation addition and Rimsky et al.'s contrastive steering both come down to this: a
direction in the residual stream (from a file, from the difference of the mean activations of two prompt
sets, or from a stored run's label column) is added at one layer on every forward of `generate`
(the prompt and each new token). The result holds the text generated with and without the addition from
the same prompts and seed, and the tokens whose next-token logit the addition raised most.

Example
-------
>>> direction = contrast_direction(loaded, ["I love it", "Great"], ["I hate it", "Awful"], "blocks.3")  # doctest: +SKIP
>>> Steering(loaded).generate("The movie was", direction, layers="blocks.3", alpha=4.0).steered       # doctest: +SKIP
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ._common import (as_prompts, check_generation_length, check_run_model, check_stack, device_of, edit_activation,
                      hidden_refs, is_causal_lm, make_batch, run_logits, tokenize)


@dataclass
class SteeringResult:
    """Generations from the same prompts with and without the steering vector.

    baseline, steered : list of str
        The generated continuations (prompt excluded).
    promoted, demoted : list of (token, logit change)
        At the first prompt's last token: the tokens whose logit the addition raised / lowered most.
    """

    prompts: list[str]
    layer: str
    alpha: float
    direction_norm: float
    baseline: list[str]
    steered: list[str]
    baseline_ids: list[list[int]]
    steered_ids: list[list[int]]
    promoted: list[tuple[str, float]]
    demoted: list[tuple[str, float]]

    @property
    def changed(self) -> list[bool]:
        return [a != b for a, b in zip(self.baseline_ids, self.steered_ids)]

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "alpha": self.alpha, "direction_norm": self.direction_norm,
                "n_prompts": len(self.prompts), "n_changed": int(sum(self.changed)),
                "generations": [{"prompt": p, "baseline": b, "steered": s, "changed": c}
                                for p, b, s, c in zip(self.prompts, self.baseline, self.steered, self.changed)],
                "promoted": [{"token": t, "logit_change": v} for t, v in self.promoted],
                "demoted": [{"token": t, "logit_change": v} for t, v in self.demoted]}


@contextmanager
def add_direction(ref: Any, vector: torch.Tensor) -> Iterator[None]:
    """While inside, `vector` (d,) is added to `ref`'s tensor at every position of every forward."""
    def add(tensor: torch.Tensor) -> torch.Tensor:
        return tensor + vector.to(tensor.device, tensor.dtype)

    with edit_activation(ref, add):
        yield


class Steering:
    """Generate with a steering vector added at one layer of a model loaded with ``load_model(..., head=True)``."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def generate(self, inputs: str | Sequence[str], direction: Any, layers: str = "blocks.0", alpha: float = 1.0,
                 max_new_tokens: int = 20, do_sample: bool = False, seed: int = 0, normalize: bool = False,
                 top_k: int = 10) -> SteeringResult:
        """Generate from each prompt with and without ``alpha * direction`` added at `layers`.

        Parameters
        ----------
        inputs : str or list of str
        direction : array-like of shape (d,) or path of a .npy file
        layers : str
            One hidden layer (``blocks.N``, ``blocks.N.mlp``, ``blocks.N.attn``).
        alpha : float
            Scale of the addition; 0 adds nothing (the generations are identical).
        max_new_tokens : int
        do_sample : bool
            Greedy decoding by default; sampling draws from the same seed with and without steering.
        normalize : bool
            Scale `direction` to unit norm first (then `alpha` is the added norm).
        top_k : int
            Promoted / demoted tokens reported.
        """
        check_stack(self.loaded, "steering")
        if not is_causal_lm(self.loaded):
            raise ConfigError(f"model {self.loaded.name} cannot generate text (not a next-token model): steering "
                              "needs a causal LM loaded with head=True")
        prompts = as_prompts(inputs)
        if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
            raise ConfigError(f"alpha={alpha!r} must be a finite number")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        for prompt in prompts:  # past the model's positions generate fails inside the embedding
            check_generation_length(self.loaded, len(tokenize(self.loaded, prompt)), max_new_tokens,
                                    what=f"prompt {prompt[:40]!r}")
        ref = one_layer(self.loaded, layers, "steering")
        vector = load_direction(direction)
        width = layer_width(self.loaded, ref, prompts[0])
        if vector.shape != (width,):
            raise ConfigError(f"direction has shape {tuple(vector.shape)} but {ref.name} has {width} features: "
                              "compute the direction at the same layer of the same model")
        norm = float(vector.norm())
        if normalize:
            if norm == 0:
                raise ConfigError("direction is all zeros: it cannot be normalised")
            vector = vector / norm
        added = vector * float(alpha)
        baseline, steered = [], []
        for prompt in prompts:
            baseline.append(self._generate(prompt, max_new_tokens, do_sample, seed))
            with add_direction(ref, added):
                steered.append(self._generate(prompt, max_new_tokens, do_sample, seed))
        promoted, demoted = self._logit_change(prompts[0], ref, added, top_k)
        decode = self.loaded.tokenizer.decode
        return SteeringResult(prompts, ref.name, float(alpha), norm, [decode(ids) for ids in baseline],
                              [decode(ids) for ids in steered], baseline, steered, promoted, demoted)

    def _generate(self, prompt: str, max_new_tokens: int, do_sample: bool, seed: int) -> list[int]:
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        ids = torch.as_tensor([tokenize(self.loaded, prompt)], device=device_of(model))
        torch.manual_seed(int(seed))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        return out[0, ids.shape[1]:].tolist()

    def _logit_change(self, prompt: str, ref: Any, added: torch.Tensor, top_k: int):
        batch = make_batch(self.loaded, [tokenize(self.loaded, prompt)])
        with torch.no_grad():
            before = run_logits(self.loaded, batch)[0, -1]
            with add_direction(ref, added):
                after = run_logits(self.loaded, batch)[0, -1]
        change = (after - before).double().cpu()
        k = min(max(int(top_k), 0), change.numel())
        tokens = self.loaded.tokenizer.convert_ids_to_tokens
        up = torch.topk(change, k).indices.tolist()
        down = torch.topk(-change, k).indices.tolist()
        return ([(tokens(i), float(change[i])) for i in up], [(tokens(i), float(change[i])) for i in down])


# ------------------------------------------------------------------------------------------- directions
def one_layer(loaded: Any, layers: str, what: str) -> Any:
    refs = hidden_refs(loaded, layers, what)
    if len(refs) != 1:
        raise ConfigError(f"{what} works at one layer; layers={layers!r} names {len(refs)} "
                          f"({', '.join(r.name for r in refs[:4])}{' ...' if len(refs) > 4 else ''})")
    return refs[0]


def layer_width(loaded: Any, ref: Any, prompt: str) -> int:
    """Features of `ref`'s tensor per token (one forward)."""
    batch = make_batch(loaded, [tokenize(loaded, prompt)])
    with torch.no_grad(), Capture([ref]) as capture:
        capture.run(run_logits, loaded, batch)
    return int(np.prod(capture.outputs[ref.name].shape[2:]))


def load_direction(direction: Any) -> torch.Tensor:
    """A direction from an array-like or a .npy path -> float32 tensor of shape (d,)."""
    if isinstance(direction, (str, os.PathLike)):
        path = os.fspath(direction)
        if not os.path.isfile(path):
            raise ConfigError(f"direction file {path!r} does not exist: give a .npy file holding one vector")
        with open(path, "rb") as handle:
            magic = handle.read(6)
        if magic != b"\x93NUMPY":  # numpy's own message for other files talks of pickled data
            raise ConfigError(f"direction file {path!r} is not a .npy file (written by numpy.save): save the vector "
                              "with numpy.save('direction.npy', vector)")
        try:
            direction = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read direction file {path!r} as .npy: {error}") from None
    array = np.asarray(direction.detach().cpu() if isinstance(direction, torch.Tensor) else direction,
                       dtype=np.float64)
    array = array.squeeze()
    if array.ndim != 1 or not array.size:
        raise ConfigError(f"direction must be one vector (d,), got shape {np.shape(direction)}")
    if not np.isfinite(array).all():
        raise ConfigError("direction holds NaN or infinite values")
    return torch.as_tensor(array, dtype=torch.float32)


def contrast_direction(loaded: Any, positive: Sequence[str], negative: Sequence[str], layers: str,
                       pooling: str = "mean", batch_size: int = 16) -> np.ndarray:
    """Mean activation of `positive` prompts minus that of `negative` prompts at one layer: (d,).

    Each prompt is pooled over its tokens (``pooling="mean"``) or taken at its last token (``"last"``) first.
    """
    if pooling not in ("mean", "last"):
        raise ConfigError(f"pooling={pooling!r} must be one of mean, last")
    check_stack(loaded, "a steering direction")  # its forward reads one stack's logits
    ref = one_layer(loaded, layers, "a steering direction")
    means = []
    for prompts, what in ((positive, "positive"), (negative, "negative")):
        pooled = []
        texts = as_prompts(prompts, f"{what} prompts")
        for start in range(0, len(texts), batch_size):
            batch = make_batch(loaded, [tokenize(loaded, t) for t in texts[start:start + batch_size]])
            with torch.no_grad(), Capture([ref]) as capture:
                capture.run(run_logits, loaded, batch)
            x = capture.outputs[ref.name].reshape(len(batch), batch.ids.shape[1], -1).double().cpu()
            if pooling == "last":
                pooled.append(x[torch.arange(len(batch)), batch.last])
            else:
                mask = batch.mask[..., None].double()
                pooled.append((x * mask).sum(1) / mask.sum(1))
        means.append(torch.cat(pooled).mean(0))
    return (means[0] - means[1]).numpy().astype(np.float32)


def run_direction(run: Any, layer: str, labels: str, positive: Any, negative: Any,
                  loaded: Any = None) -> np.ndarray:
    """Difference of the class means of a stored run's `layer` rows: label `positive` minus label `negative`.

    With `loaded` (the model to be steered), a run extracted from another model is refused: its direction
    lives in another activation space, even when the widths agree.
    """
    from ..store import open_run

    opened = open_run(run)
    if loaded is not None:
        check_run_model(opened, loaded, "steer with a direction from a run of the same model")
    if layer not in opened.layers:
        raise ConfigError(f"run {opened.path} has no layer {layer!r}; it holds {', '.join(opened.layers)}")
    prompts = opened.prompts
    if labels not in prompts.columns:
        columns = [c for c in prompts.columns if c not in ("sample_id", "text")]
        raise ConfigError(f"run {opened.path} has no label column {labels!r}; its columns: "
                          f"{', '.join(columns) or '(none)'}")
    by_id = dict(zip(prompts["sample_id"].to_numpy().tolist(), prompts[labels].astype(str).tolist()))
    sums = {str(positive): None, str(negative): None}
    counts = {key: 0 for key in sums}
    if len(sums) != 2:
        raise ConfigError(f"positive and negative labels are both {positive!r}: give two different classes")
    rows = 0
    for start, chunk in _chunks(opened, layer):
        ids = opened.sample_ids(layer, (start, start + len(chunk)))
        labels_of = np.asarray([by_id.get(int(i)) for i in ids], dtype=object)
        flat = chunk.reshape(len(chunk), -1).astype(np.float64)
        for key in sums:
            picked = flat[labels_of == key]
            if len(picked):
                sums[key] = picked.sum(0) if sums[key] is None else sums[key] + picked.sum(0)
                counts[key] += len(picked)
        rows += len(chunk)
    missing = [key for key, n in counts.items() if n == 0]
    if missing:
        values = sorted(set(by_id.values()))
        raise ConfigError(f"label {missing[0]!r} has no row in column {labels!r} of run {opened.path}; its values: "
                          f"{', '.join(values[:12])}{' ...' if len(values) > 12 else ''}")
    pos, neg = (sums[k] / counts[k] for k in (str(positive), str(negative)))
    return (pos - neg).astype(np.float32)


def _chunks(opened: Any, layer: str, size: int = 4096):
    start = 0
    for chunk in opened.iter_batches(layer, batch_size=size):
        yield start, chunk
        start += len(chunk)
