"""Where concept and random examples come from: a stored run's label column, or prompts extracted now.

A CAV is only meaningful in the activation space it was fitted in, so the examples of a TCAV must be
the same model's activations at the same layer, pooled as the run was. `examples_from_run` reads the
rows of one label value (the concept) and the other rows (or those of a `negative` value), streamed
through the run's reader and capped at `max_rows` per side by a seeded sample; `examples_from_prompts`
extracts prompts with the live model and the run's pooling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError
from .cav import split_by_label


def _capped(positions: np.ndarray, max_rows: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_rows is None or len(positions) <= max_rows:
        return positions
    return np.sort(rng.choice(positions, int(max_rows), replace=False))


def _layer_input(run: Any, layer: str, labels: str | None):
    from ..analysis.inputs import LayerInput
    from ..analysis.runner import committed_ranges

    if layer not in run.layers:
        from ..errors import UnknownLayerError

        raise UnknownLayerError(f"run {run.path} has no layer {layer!r}; it holds {', '.join(run.layers)}")
    return LayerInput(run.path, run.manifest, layer, committed_ranges(run, layer), labels)


def label_values(run: Any, labels: str) -> None:
    """ConfigError when `labels` is not a label column of the run's prompts (lists the columns)."""
    columns = [c for c in run.prompt_columns if c not in ("sample_id", "text")]
    if labels not in columns:
        raise ConfigError(f"label column {labels!r} is not in run {run.path}'s prompts; label columns: "
                          f"{', '.join(columns) or '(none)'}")


def examples_from_run(run: Any, layers: str | Sequence[str], labels: str | None = None, concept: Any = None,
                      negative: Any = None, max_rows: int | None = 2000, seed: int = 0,
                      concept_rows: dict[str, np.ndarray] | None = None, name: str | None = None):
    """ConceptExamples of `concept` (rows whose `labels` value equals it) vs the run's other rows.

    With `concept_rows` given ({layer: array}, e.g. extracted from prompts) the run supplies only the
    random examples: every row, or the rows whose label equals `negative`; `concept` is then unused.
    At most `max_rows` rows per side are read (a seeded sample), batch by batch.

    `layers` is a layer spec string, as everywhere else (``"blocks.*"``, ``"blocks.0-2, embed"``, ``"all"``;
    matched against the run's layers by `neuronmap.analysis.runner.select_layers`, in the run's order), or a
    list of exact layer names (kept in the given order).
    """
    from ..store import open_run
    from .tcav import ConceptExamples

    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer))
                                 or max_rows < 2):
        raise ConfigError(f"max_rows={max_rows!r} must be an integer >= 2 (rows read per side) or None for every row")
    run = open_run(run)
    if isinstance(layers, str):
        from ..analysis.runner import select_layers

        layers = select_layers(run, layers)
    if labels is not None:
        label_values(run, labels)
    elif concept_rows is None or negative is not None:
        raise ConfigError("concept examples from a run need a label column: pass labels (--labels COLUMN) and the "
                          "concept's value (--concept VALUE)")
    if concept_rows is None and concept is None:
        raise ConfigError("pass the concept's label value (--concept VALUE)")
    concept_out: dict[str, np.ndarray] = {}
    random_out: dict[str, np.ndarray] = {}
    for layer in layers:
        data = _layer_input(run, layer, labels)
        if labels is not None:
            values = data.labels()
            if concept_rows is None:
                c_pos, r_pos = split_by_label(values, concept, negative, labels)
            elif negative is not None:
                split_by_label(values, negative, None, labels)  # one-line errors: single value, absent value
                text = np.asarray([str(v) for v in values], dtype=object)
                c_pos, r_pos = np.empty(0, dtype=np.int64), np.flatnonzero(text == str(negative))
            else:
                c_pos, r_pos = np.empty(0, dtype=np.int64), np.arange(data.n_rows)
        else:
            c_pos, r_pos = np.empty(0, dtype=np.int64), np.arange(data.n_rows)
        rng = np.random.default_rng(seed)
        c_pos, r_pos = _capped(c_pos, max_rows, rng), _capped(r_pos, max_rows, rng)
        if concept_rows is None:
            both = np.union1d(c_pos, r_pos)
            rows = data.take(both)
            concept_out[layer] = rows[np.searchsorted(both, c_pos)]
            random_out[layer] = rows[np.searchsorted(both, r_pos)]
        else:
            if layer not in concept_rows:
                raise ConfigError(f"no concept examples at {layer}")
            concept_out[layer] = np.asarray(concept_rows[layer])
            random_out[layer] = data.take(r_pos)
    label = name or (str(concept) if concept is not None else "concept")
    source = f"{run.path}:{labels}={concept}" if concept_rows is None else f"prompts vs {run.path}"
    return ConceptExamples(name=label, concept=concept_out, random=random_out, source=source)


def examples_from_prompts(loaded: Any, texts: Sequence[str], layers: Sequence[str], pooling: str = "mean",
                          batch_size: int = 16, max_length: int = 512) -> dict[str, np.ndarray]:
    """Activations of `texts` at `layers`, pooled like a run: {layer: (rows, d)} (pooling none: one row per token).

    Tokenised and pooled exactly as `neuronmap extract` does (same tokenizer call, the same pooling on
    the device), so the rows live in the same space as a run of the same model.
    """
    import torch

    from ..capture import Capture
    from ..extraction import pad_batch, tokenize_prompts
    from ..interventions._common import as_prompts, hidden_refs
    from ..pooling import check_pooling, pool

    texts = as_prompts(texts, "concept prompts")
    check_pooling(pooling)
    refs = hidden_refs(loaded, list(layers), "concept extraction")
    tokens = tokenize_prompts(loaded.tokenizer, texts, max_length)
    out: dict[str, list[np.ndarray]] = {ref.name: [] for ref in refs}
    device = torch.device(loaded.device) if not isinstance(loaded.device, torch.device) else loaded.device
    for start in range(0, len(texts), batch_size):
        ids, mask = pad_batch([list(i) for i in tokens.ids[start:start + batch_size]], loaded.tokenizer.pad_token_id,
                              device)
        with torch.no_grad(), Capture(refs, transform=lambda ref, t: pool(t.float(), mask, pooling),
                                      stop_early=True) as cap:
            cap.run(loaded.adapter.forward, ids, mask, refs)
        for ref in refs:
            out[ref.name].append(cap.outputs[ref.name].reshape(cap.outputs[ref.name].shape[0], -1).cpu().numpy())
    return {name: np.concatenate(parts).astype(np.float64) for name, parts in out.items()}


def check_run_model(run: Any, loaded: Any) -> None:
    """The run must hold this model's activations: same config hash (else ConfigError naming both)."""
    manifest = run.manifest
    if manifest.config_hash and loaded.config_hash and manifest.config_hash != loaded.config_hash:
        raise ConfigError(f"run {Path(run.path)} was extracted from {manifest.model} (config {manifest.config_hash[:12]}) "
                          f"but the model is {loaded.name} (config {loaded.config_hash[:12]}): CAVs only make sense "
                          "in the activation space of the model they are tested on")
