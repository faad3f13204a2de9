"""Ablation of neurons, attention heads and whole layers (MLP, attention, residual), and its effect on a metric.

Knock a component out and see how much the model's behaviour changes. Three ways to knock it out:

- ``"zero"``: set it to 0 (simple, but 0 may be far from anything the model ever sees);
- ``"mean"``: set it to its mean over a reference set of tokens (the `baselines` prompts, else the `inputs`
  themselves) or over a stored run's rows of that layer (`run`);
- ``"resample"``: set it, row by row and position by position, to its value on another prompt of the same
  token length (the `baselines`, else another input: see `resample_partners`), which keeps it on the data
  distribution (Chan et al.'s causal scrubbing uses this).

The metric is the next-token loss (``target=None``, causal LMs), the logit difference
``logit[answer] - logit[wrong]`` at the last token (``target=(answer, wrong)``) or the log-probability of
one token (``target=answer``). ``effect = ablated - clean``.

Example
-------
>>> result = Ablation(loaded).attribute(prompts, method="mean", layers="blocks.*.attn.heads.*")  # doctest: +SKIP
>>> result.effect.reshape(n_blocks, n_heads)                                                  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ._common import (Batch, Metric, Progress, as_prompts, check_batch_size, check_run_model, check_stack,
                      edit_activation, evaluate, prompt_batch, run_logits, tokenize)
from .components import Component, resolve_components

METHODS = ("zero", "mean", "resample")


@dataclass
class AblationResult:
    """Metric of the model with each component ablated.

    components : list of str
        What was ablated (one entry ``"all: ..."`` when ablated together).
    clean : float
        The metric without ablation.
    ablated : ndarray of shape (n_components,)
        The metric with that component ablated.
    effect : ndarray of shape (n_components,)
        ``ablated - clean`` (positive = loss went up / logit difference went up).
    """

    components: list[str]
    method: str
    metric: dict[str, Any]
    clean: float
    ablated: np.ndarray
    n_prompts: int
    effect: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.effect = self.ablated - self.clean

    def summary(self) -> dict[str, Any]:
        order = np.argsort(-np.abs(self.effect), kind="stable")[:10]
        return {"method": self.method, **self.metric, "clean": self.clean, "n_prompts": self.n_prompts,
                "components": self.components,
                "largest": [{"component": self.components[i], "ablated": float(self.ablated[i]),
                             "effect": float(self.effect[i])} for i in order]}


class Ablation:
    """Ablate components of a model loaded with ``load_model(..., head=True)``.

    Parameters
    ----------
    loaded : LoadedModel
    batch_size : int
        Prompts run together in one forward.
    """

    def __init__(self, loaded: Any, batch_size: int = 16) -> None:
        self.loaded = loaded
        self.batch_size = batch_size

    def attribute(self, inputs: str | Sequence[str], method: str = "zero", target: Any = None,
                  layers: str | Sequence[str] = "blocks.*.attn.heads.*", baselines: str | Sequence[str] | None = None,
                  run: Any = None, together: bool = False, progress: Progress | None = None) -> AblationResult:
        """Ablate each component in `layers` (or all of them at once with ``together=True``).

        Parameters
        ----------
        inputs : str or list of str
            Prompts the metric is measured on.
        method : "zero" | "mean" | "resample"
        target : None | (answer, wrong) | answer
            None: next-token loss; a pair: logit difference at the last token; one token: its log-probability.
        layers : str or list of str
            Components (`neuronmap.interventions.components`): heads ``blocks.*.attn.heads.*``, MLPs
            ``blocks.*.mlp``, neurons ``blocks.3.mlp[5,9]``. An empty spec with ``together=True`` ablates nothing.
        baselines : str or list of str, optional
            Reference prompts: the mean of "mean" is taken over their tokens, "resample" takes row r's values
            from ``baselines[r % len(baselines)]`` (same token length as the input). Default: the inputs
            (for "resample": the next input of the same token length, cycling; `resample_partners`).
        run : path or Run, optional
            "mean" from a stored run instead: the mean of each layer's rows (layer and neuron components whose
            layer the run holds; the run must come from the same model).
        """
        check_stack(self.loaded, "ablation")
        check_batch_size(self.batch_size)
        if method not in METHODS:
            raise ConfigError(f"method={method!r} must be one of {', '.join(METHODS)}")
        prompts = as_prompts(inputs)
        metric = Metric.from_target(self.loaded, target)
        components = resolve_components(self.loaded, layers)
        if not components and not together:
            raise ConfigError(f"layers={layers!r} names no component: give e.g. blocks.*.attn.heads.* or blocks.0.mlp")
        if run is not None and method != "mean":
            raise ConfigError(f"run= gives means; it does not apply to method={method!r} (use method='mean')")
        batch = prompt_batch(self.loaded, prompts)
        reference = self._reference(prompts, baselines, method)
        return self.ablate_batch(batch, components, metric, method, reference, run, together, progress)

    # -- the work, on token batches (also used by head statistics) --------------------------------------
    def ablate_batch(self, batch: Batch, components: list[Component], metric: Metric, method: str,
                     reference: Batch | None, run: Any = None, together: bool = False,
                     progress: Progress | None = None) -> AblationResult:
        batch_size = check_batch_size(self.batch_size)
        self._check_neurons(components, batch)
        clean = evaluate(self.loaded, batch, metric, batch_size)
        if method == "mean":
            values = run_means(self.loaded, components, run) if run is not None else \
                self._batch_means(components, reference if reference is not None else batch)
        elif method == "resample":
            values = self._site_values(components, reference)
        else:
            values = {c.name: torch.zeros(()) for c in components}
        groups = [components] if together else [[c] for c in components]
        names = [("all: " + ", ".join(c.name for c in components)) if components else "none"] if together else \
            [c.name for c in components]
        ablated = np.empty(len(groups))
        for i, group in enumerate(groups):
            ablated[i] = self._ablated_metric(batch, group, values, metric, method, batch_size)
            if progress is not None:
                progress(i + 1, len(groups))
        return AblationResult(names, method, metric.summary(self.loaded), clean, ablated, len(batch))

    def _ablated_metric(self, batch: Batch, group: list[Component], values: dict[str, torch.Tensor], metric: Metric,
                        method: str, batch_size: int) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(batch), batch_size):
                rows = list(range(start, min(start + batch_size, len(batch))))
                chunk = batch.rows(rows)
                with ExitStack() as stack:
                    for component in group:
                        value = values[component.name]
                        if method == "resample":
                            value = value[rows]
                        stack.enter_context(edit_activation(component.site, _replacer(component, value)))
                    part, n = metric.parts(run_logits(self.loaded, chunk), chunk)
                total += float(part)
                count += int(n)
        return total / max(count, 1)

    def _check_neurons(self, components: list[Component], batch: Batch) -> None:
        """Neuron indices must lie inside their layer (one forward on the first prompt measures it)."""
        neurons = [c for c in components if c.kind == "neurons"]
        if not neurons:
            return
        sites = self._capture_sites(neurons, batch.rows([0]))
        for component in neurons:
            width = sites[component.site.name].shape[-1]
            if max(component.index) >= width:
                raise ConfigError(f"{component.name}: neuron {max(component.index)} is out of range, "
                                  f"{component.site.name} has {width} features (0-{width - 1})")

    def _reference(self, prompts: list[str], baselines: Any, method: str) -> Batch | None:
        if method == "zero":
            return None
        if baselines is None:
            if method == "mean":
                return None
            lengths = [len(tokenize(self.loaded, p)) for p in prompts]
            return prompt_batch(self.loaded, [prompts[j] for j in resample_partners(prompts, lengths)])
        sources = as_prompts(baselines, "baselines")
        if method == "mean":
            return prompt_batch(self.loaded, sources)
        sources = [sources[r % len(sources)] for r in range(len(prompts))]
        for prompt, source in zip(prompts, sources):
            n, m = len(tokenize(self.loaded, prompt)), len(tokenize(self.loaded, source))
            if n != m:
                raise ConfigError(f"resample ablation pairs positions, but input {prompt!r} has {n} tokens and its "
                                  f"baseline {source!r} has {m}: give baselines of equal token length, leave "
                                  "baselines unset (each input then takes another input of its length), or use "
                                  "method='mean'")
        return prompt_batch(self.loaded, sources)

    def _capture_sites(self, components: list[Component], batch: Batch) -> dict[str, torch.Tensor]:
        """Site tensors of `batch` (rows in order), one forward per chunk."""
        sites = {c.site.name: c.site for c in components}
        out: dict[str, list[torch.Tensor]] = {name: [] for name in sites}
        with torch.no_grad(), Capture(list(sites.values())) as capture:
            for start in range(0, len(batch), self.batch_size):
                chunk = batch.rows(range(start, min(start + self.batch_size, len(batch))))
                capture.run(run_logits, self.loaded, chunk)
                for name in sites:
                    out[name].append(capture.outputs[name].reshape(*capture.outputs[name].shape[:2], -1))
        return {name: torch.cat(parts) for name, parts in out.items()}

    def _batch_means(self, components: list[Component], reference: Batch) -> dict[str, torch.Tensor]:
        """Each component's mean over the real tokens of `reference`: (k,)."""
        sites = self._capture_sites(components, reference)
        mask = reference.mask.bool()
        means = {}
        for component in components:
            taken = component.take(sites[component.site.name])  # (batch, seq, k)
            means[component.name] = taken[mask.to(taken.device)].double().mean(dim=0).to(taken.dtype)
        return means

    def _site_values(self, components: list[Component], reference: Batch) -> dict[str, torch.Tensor]:
        sites = self._capture_sites(components, reference)
        return {c.name: c.take(sites[c.site.name]) for c in components}


def resample_partners(prompts: Sequence[str], lengths: Sequence[int]) -> list[int]:
    """Which input each input takes its values from in resample ablation without baselines.

    Resampling replaces position by position, so the partner must have the same token length; it must also be
    another prompt, else nothing changes. The rule is deterministic: input r takes the next input after r, in
    prompt order and cycling round to the start, whose token length equals its own. When every prompt has the
    same length that is input r + 1 (the last takes the first).

    Parameters
    ----------
    prompts : list of str of length n
        The inputs (only named in the error).
    lengths : list of int of length n
        Their token lengths.

    Returns
    -------
    list of int of length n
        ``partners[r]`` is the index of the input whose values replace input r's; never r itself.
    """
    by_length: dict[int, list[int]] = {}
    for r, n in enumerate(lengths):
        by_length.setdefault(n, []).append(r)
    alone = [r for r in range(len(prompts)) if len(by_length[lengths[r]]) < 2]
    if alone:
        r = alone[0]
        more = f" (and {len(alone) - 1} more prompt(s) with a length no other prompt has)" if len(alone) > 1 else ""
        raise ConfigError(f"resample ablation takes each input's values from another input of the same token "
                          f"length, but input {prompts[r]!r} is the only one with {lengths[r]} tokens{more}: add "
                          f"another prompt of {lengths[r]} tokens, drop that prompt, or use method='mean'")
    partners = [0] * len(lengths)
    for group in by_length.values():
        for i, r in enumerate(group):
            partners[r] = group[(i + 1) % len(group)]
    return partners


def _replacer(component: Component, value: torch.Tensor):
    def replace(tensor: torch.Tensor) -> torch.Tensor:
        return component.put(tensor, value)

    return replace


def run_means(loaded: Any, components: list[Component], run: Any) -> dict[str, torch.Tensor]:
    """Mean of each component over every row a stored run holds of its layer (float64 accumulation)."""
    from ..store import open_run

    opened = open_run(run)
    check_run_model(opened, loaded, "take means from a run of the same model")
    means = {}
    cache: dict[str, np.ndarray] = {}
    for component in components:
        if component.kind == "head":
            raise ConfigError(f"a stored run holds no per-head values ({component.name}); mean-ablate heads over "
                              "the batch (leave run unset) or ablate the layer blocks.N.attn")
        layer = component.site.name
        if layer not in opened.layers:
            raise ConfigError(f"run {opened.path} has no layer {layer!r} for {component.name}; it holds "
                              f"{', '.join(opened.layers)}")
        if layer not in cache:
            total, rows = None, 0
            for chunk in opened.iter_batches(layer):
                flat = chunk.reshape(len(chunk), -1).astype(np.float64)
                total = flat.sum(axis=0) if total is None else total + flat.sum(axis=0)
                rows += len(flat)
            if not rows:
                raise ConfigError(f"run {opened.path} holds no rows of {layer}")
            cache[layer] = total / rows
        mean = torch.as_tensor(cache[layer], dtype=torch.float32)
        if component.kind == "neurons":
            if max(component.index) >= len(mean):
                raise ConfigError(f"{component.name}: {layer} has {len(mean)} features in run {opened.path}")
            mean = mean[list(component.index)]
        means[component.name] = mean
    return means
