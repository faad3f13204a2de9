"""`cav` and `top-activations`: concept activation vectors and top-k activating inputs of a stored run.

Maths in `neuronmap.concepts.cav` and `neuronmap.concepts.topk` (numpy and scikit-learn only; the
TCAV scores need the live model and live in `neuronmap tcav`).

- `cav` (per layer, needs --labels): for each concept value, a linear classifier separating its rows
  from the other rows (or those of `negative`) on balanced seeded samples; the CAV (unit normal of
  the boundary), its held-out accuracy, the held-out accuracy of random-vs-random CAVs (what chance
  looks like with that many examples and features), and the cosine between the concepts' CAVs.
- `top-activations` (one unit for the run): for each chosen neuron, the k rows with the largest
  activation, streamed batch by batch (`open_run(...).iter_batches`, memory O(k x neurons + batch));
  per-sample layers give the prompts, per-token layers (pooling none) the token and its context.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Union

import numpy as np
import pandas as pd
from pydantic import Field

from ...concepts.cav import cosine_matrix, fit_cav, label_text, split_by_label
from ...concepts.topk import TopActivations, parse_neurons
from ...errors import ConfigError
from ..inputs import LayerInput, RunInput
from ..registry import AnalysisResult, Params, register

Value = Union[int, float, str]
# bool first: `concept=true` stays True (the label text "True" of a boolean column) instead of becoming 1.
LabelValue = Union[bool, int, float, str]


class CAVParams(Params):
    concept: Optional[Union[LabelValue, list[LabelValue]]] = Field(
        None, description="label value(s) of the concept rows (true/false for a boolean column); several "
                          "(concept=a,b) also give their cosine")
    negative: Optional[LabelValue] = Field(None, description="label value of the random rows (default: every other "
                                                             "row)")
    classifier: Literal["logistic", "svm"] = Field("logistic", description="linear classifier of the CAV")
    C: float = Field(0.1, gt=0, description="inverse L2 strength of the classifier (strong: the CAV follows the "
                     "concept's mean difference rather than a max-margin boundary through noise)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each side held out for the accuracy")
    max_samples: int = Field(2000, ge=2, description="rows per side (a seeded sample above this)")
    random_runs: int = Field(5, ge=0, description="random-vs-random CAVs giving the chance accuracy")
    seed: int = Field(0, description="seeds the samples and the hold-out split")


def _concepts(params: CAVParams) -> list[Any]:
    values = params.concept if isinstance(params.concept, list) else [params.concept]
    if params.concept is None or not values:
        raise ConfigError("cav needs the concept's label value: --param concept=VALUE (several: concept=a,b)")
    if len({str(v) for v in values}) != len(values):
        raise ConfigError(f"concept={values!r} repeats a value; list each concept once")
    return values


def _check_cav(data: LayerInput, params: CAVParams) -> None:
    _concepts(params)


@register("cav", family="concepts", params=CAVParams, scope="layer", needs_labels=True, check=_check_cav,
          summary="concept activation vectors of label values per layer: held-out accuracy, chance, cosine between "
                  "concepts",
          version="2")  # 2: dead neurons left out of the fit; per-token runs hold out whole prompts
def cav_analysis(data: LayerInput, params: CAVParams) -> AnalysisResult:
    concepts = _concepts(params)
    labels = data.labels()
    rng = np.random.default_rng(params.seed)
    plans = []
    column = data.labels_column or "labels"
    for concept in concepts:
        c_pos, r_pos = split_by_label(labels, concept, params.negative, column)
        concept = label_text(labels, concept, column)  # as stored: true -> "True" of a boolean column
        size = min(len(c_pos), len(r_pos), params.max_samples)
        if size < 2:
            raise ConfigError(f"concept {str(concept)!r} has {len(c_pos)} rows and the random side {len(r_pos)} at "
                              f"{data.layer}: a CAV needs at least 2 of each")
        if size < min(len(c_pos), len(r_pos)) or len(c_pos) != len(r_pos):
            c_pick = np.sort(rng.choice(c_pos, size, replace=False))
            r_pick = np.sort(rng.choice(r_pos, size, replace=False))
        else:
            c_pick, r_pick = c_pos, r_pos
        half = min(size, len(r_pos) // 2)
        nulls = []
        if params.random_runs and half >= 2:
            for _ in range(params.random_runs):
                both = rng.choice(r_pos, 2 * half, replace=False)
                nulls.append((np.sort(both[:half]), np.sort(both[half:])))
        elif params.random_runs:
            warnings.warn(f"{data.layer}: too few random rows ({len(r_pos)}) for random-vs-random CAVs of "
                          f"{str(concept)!r}", UserWarning, stacklevel=2)
        plans.append((concept, c_pick, r_pick, nulls, len(c_pos), len(r_pos)))
    if len({plan[0] for plan in plans}) != len(plans):
        raise ConfigError(f"concept={', '.join(plan[0] for plan in plans)} names one label value twice; list each "
                          "concept once")
    needed = np.unique(np.concatenate([np.concatenate([c, r, *[np.concatenate(n) for n in nulls]])
                                       for _, c, r, nulls, _, _ in plans]))
    rows = data.take(needed)

    def at(positions: np.ndarray) -> np.ndarray:
        return rows[np.searchsorted(needed, positions)]

    metrics: dict[str, Any] = {}
    vectors, accuracy, chance, table = [], [], [], []
    prompt_of = data.sample_ids(needed)  # per-token runs: a prompt's tokens are held out together

    def group(positions: np.ndarray) -> np.ndarray:
        return prompt_of[np.searchsorted(needed, positions)]

    for concept, c_pick, r_pick, nulls, n_concept, n_random in plans:
        cav = fit_cav(at(c_pick), at(r_pick), params.classifier, params.C, params.test_fraction, seed=params.seed,
                      concept_groups=group(c_pick), random_groups=group(r_pick))
        random_acc = [fit_cav(at(a), at(b), params.classifier, params.C, params.test_fraction,
                              seed=params.seed + i, concept_groups=group(a), random_groups=group(b)).accuracy
                      for i, (a, b) in enumerate(nulls)]
        vectors.append(cav.vector)
        accuracy.append(cav.accuracy)
        chance.append(float(np.mean(random_acc)) if random_acc else np.nan)
        table.append({"concept": str(concept), "accuracy": cav.accuracy, "random_accuracy": chance[-1],
                      "n_concept": n_concept, "n_random": n_random, "per_side": len(c_pick), "n_test": cav.n_test,
                      "raw_norm": cav.raw_norm, "intercept": cav.intercept, "n_dead": cav.n_dead})
    names = [plan[0] for plan in plans]  # the label text of each concept
    for name, acc in zip(names, accuracy):
        metrics[f"accuracy:{name}"] = acc
    for name, value in zip(names, chance):
        if np.isfinite(value):
            metrics[f"random_accuracy:{name}"] = value
    cosine = cosine_matrix(np.stack(vectors))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            metrics[f"cosine:{names[i]}|{names[j]}"] = float(cosine[i, j])
    metrics.update({"concepts": names, "classifier": params.classifier, "negative": params.negative})
    arrays = {"cavs": np.stack(vectors), "accuracy": np.asarray(accuracy), "random_accuracy": np.asarray(chance),
              "cosine": cosine, "concepts": np.asarray(names, dtype=str)}
    return AnalysisResult(metrics=metrics, arrays=arrays, tables={"cav": pd.DataFrame(table)})


class TopParams(Params):
    neuron: Optional[Union[Value, list[Value]]] = Field(
        None, description="LAYER:INDEX (blocks.3:17) or INDEX for every selected layer; several: a,b (default: all)")
    k: int = Field(10, ge=1, description="rows kept per neuron")
    context: int = Field(8, ge=0, description="tokens shown on each side of a top token (per-token layers)")
    max_text: int = Field(300, ge=10, description="characters of prompt text kept per row in the table")


def _tokenizer(data: RunInput) -> Any:
    """The run's tokenizer for per-token context, or None (with a warning) when it cannot be loaded."""
    name = data.manifest.tokenizer or data.manifest.model
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # a synthetic run or an offline hub: token columns are left out
        warnings.warn(f"tokens of per-token layers are not shown: the run's tokenizer {name!r} cannot be loaded "
                      f"({type(error).__name__})", UserWarning, stacklevel=2)
        return None


class _TokenContext:
    """Token strings and context windows of prompts, tokenised as the extraction did (cached per prompt)."""

    def __init__(self, tokenizer: Any, max_length: int, width: int) -> None:
        self.tokenizer, self.max_length, self.width = tokenizer, max_length, width
        self.cache: dict[int, list[int]] = {}

    def __call__(self, sample_id: int, text: str, index: int) -> tuple[str, str]:
        if sample_id not in self.cache:
            self.cache[sample_id] = list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
        ids = self.cache[sample_id]
        if not 0 <= index < len(ids):
            return "", ""
        decode = self.tokenizer.decode
        token = decode([ids[index]])
        left, right = decode(ids[max(0, index - self.width):index]), decode(ids[index + 1:index + 1 + self.width])
        return token, f"{left}[[{token}]]{right}"


def check_top_k(data: RunInput, params: TopParams) -> None:
    """k cannot exceed the rows there are to rank (a layer with fewer rows ranks all of them)."""
    most = max((item.n_rows for item in data.layers.values()), default=0)
    if params.k > most:
        raise ConfigError(f"k={params.k} is more than the {most} rows of the selected layers: a neuron has at most "
                          f"{most} activations to rank; use k <= {most}")


@register("top-activations", family="concepts", params=TopParams, scope="run", check=check_top_k,
          summary="top-k activating prompts (per-sample layers) or tokens with context (per-token layers) per neuron",
          headline=("n_layers", "n_neurons", "k", "top_value", "top_neuron"))
def top_activations_analysis(data: RunInput, params: TopParams) -> AnalysisResult:
    chosen = parse_neurons(params.neuron, list(data.layers))
    prompts = data.run.prompts
    texts = dict(zip(prompts["sample_id"].to_numpy().tolist(), prompts["text"].astype(str).tolist()))
    context = None
    frames, arrays = [], {}
    best: tuple[float, str] = (-np.inf, "")
    for layer, units in chosen.items():
        item = data.layers[layer]
        state = TopActivations(max(1, min(params.k, item.n_rows)), units)  # memory: at most the layer's rows
        offset = 0
        for batch in item.iter_batches():
            state.add(batch, offset)
            offset += len(batch)
        if state.n_nan:
            warnings.warn(f"{layer}: {state.n_nan} NaN activations were ranked last", UserWarning, stacklevel=2)
        values, positions = state.result()
        neurons = np.asarray(units if units is not None else np.arange(values.shape[0]), dtype=np.int64)
        flat = positions.reshape(-1)
        found = flat >= 0  # a neuron whose every value is NaN ranks no row
        rows = np.full(flat.shape, -1, dtype=np.int64)
        rows[found] = item.layer_rows(flat[found])
        sample_ids = item.sample_ids(flat[found])
        frame = pd.DataFrame({"layer": layer, "neuron": np.repeat(neurons, values.shape[1])[found],
                              "rank": np.tile(np.arange(values.shape[1]), len(neurons))[found],
                              "value": values.reshape(-1)[found], "row": rows[found], "sample_id": sample_ids})
        per_token = bool(data.manifest.layer(layer).per_token)
        if per_token:
            token_index = item.run.token_index(layer)[rows[found]]
            frame["token_index"] = token_index
            if context is None:
                tokenizer = _tokenizer(data)
                context = False if tokenizer is None else _TokenContext(
                    tokenizer, int(data.manifest.max_length or 512), params.context)
            if context:
                pairs = [context(int(s), texts.get(int(s), ""), int(t)) for s, t in zip(sample_ids, token_index)]
                frame["token"] = [p[0] for p in pairs]
                frame["context"] = [p[1] for p in pairs]
        frame["text"] = [texts.get(int(s), "")[: params.max_text] for s in sample_ids]
        frames.append(frame)
        arrays.update({f"values@{layer}": values, f"rows@{layer}": rows.reshape(values.shape),
                       f"neurons@{layer}": neurons})
        if values.size and values[:, 0].max() > best[0]:
            top = int(values[:, 0].argmax())
            best = (float(values[top, 0]), f"{layer}:{int(neurons[top])}")
    table = pd.concat(frames, ignore_index=True)
    n_neurons = sum(len(arrays[f"neurons@{layer}"]) for layer in chosen)
    metrics: dict[str, Any] = {"n_layers": len(chosen), "n_neurons": n_neurons,
                               "k": params.k, "top_value": best[0], "top_neuron": best[1],
                               "layers": list(chosen)}
    if n_neurons <= 8:
        for (layer, neuron), group in table.groupby(["layer", "neuron"], sort=False):
            metrics[f"max:{layer}:{neuron}"] = float(group["value"].iloc[0])
    return AnalysisResult(metrics=metrics, arrays=arrays, tables={"top": table})
