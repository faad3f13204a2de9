"""Run a registered analysis over a stored run and keep the result as an artifact.

`analyze(run, "pca", layers="blocks.*", params={"n_components": 10})` opens the run, validates the
parameters, selects layers, builds one input per unit of the analysis' scope over the committed rows,
reuses ``RUN/analyses/<id>/`` when it exists, otherwise computes every unit through an engine and
writes the artifact atomically.

Engines map a picklable function over picklable tasks (`Engine.map(fn, items) -> list`; an engine may
also offer `Engine.imap(fn, items) -> iterator`, the same results in order as they become ready, which
the runner prefers so that per-shard partials are folded as they arrive). ``"local"`` runs them in
this process (`LocalEngine(workers=N)`, passed as the engine object, runs N per-shard tasks at once
on threads); any other name is looked up in the entry-point group
``neuronmap.analysis_engines`` (the entry point is a zero-argument factory returning an engine):
``ray`` comes from ``actors.analysis:RayEngine`` and runs one Ray task per layer, layer pair or shard.
The tasks are the same functions either way, so engines give the same numbers.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import pandas as pd

from ..errors import ConfigError, UnknownLayerError
from ..store import Run, open_run
from ..store.manifest import neuronmap_version, now_iso
from ._local_engine import LocalEngine, capture_warnings
from .artifacts import UNIT_COLUMN, Artifact, artifact_id, find_artifact, to_jsonable, write_artifact
from .inputs import LayerInput, PairInput, RunInput, intersect_ranges, merge_ranges
from .registry import AnalysisResult, AnalysisSpec, get_analysis

ENGINE_GROUP = "neuronmap.analysis_engines"


class Engine(Protocol):
    """Runs ``fn`` over ``items`` (both picklable), returning the results in order.

    An engine may also define ``imap(fn, items) -> Iterator``: the same results, in order, yielded as
    they are ready, holding only a bounded number of finished results (see `_imap`).
    """

    name: str

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]: ...


def _imap(engine: Engine, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
    """`engine.imap` when the engine has one, else its `map` (all results held at once)."""
    imap = getattr(engine, "imap", None)
    return iter(imap(fn, items)) if imap is not None else iter(engine.map(fn, items))


def group_entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """Entry points of `group` from every installed distribution, first one per name.

    Scans all distributions rather than `metadata.entry_points(group=...)`, which keeps only the first
    distribution of a name: a stale `neuronmap.egg-info` in the working directory would hide the
    installed package's entry points.
    """
    found: dict[str, metadata.EntryPoint] = {}
    for distribution in metadata.distributions():
        for entry in distribution.entry_points:
            if entry.group == group:
                found.setdefault(entry.name, entry)
    return found


def available_engines() -> list[str]:
    return ["local", *sorted(set(group_entry_points(ENGINE_GROUP)) - {"local"})]


def get_engine(engine: str | Engine) -> Engine:
    """An engine by name ("local" or an entry point of `neuronmap.analysis_engines`), or the object itself."""
    if not isinstance(engine, str):
        return engine
    if engine == "local":
        return LocalEngine()
    entries = group_entry_points(ENGINE_GROUP)
    if engine not in entries:
        raise ConfigError(f"engine {engine!r} is not available; installed engines: {', '.join(available_engines())}"
                          + (" (the ray engine comes with the installed neuronmap package: pip install -e .)"
                             if engine == "ray" else ""))
    return entries[engine].load()()


# ---------------------------------------------------------------------------------------------
# per-layer work shared by the pairs of a "layer_pair" analysis
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSharing:
    """How a "layer_pair" analysis does each layer's own work once for all the pairs it is in.

    Attach it with `@share_layer_work(...)` under `@register(...)`. The runner then runs, as one
    batch of engine tasks, ``layer_map(layer_input, params)`` once per distinct layer (run, layer and
    rows) and ``pair_map(pair_input, params)`` once per pair, and on the driver
    ``pair_reduce(pair_input, [first_state, second_state, pair_state], params) -> AnalysisResult``.
    For L layers, all pairs cost L layer tasks and L (L - 1) / 2 pair tasks, instead of every pair
    redoing both of its layers' own work. (Linear CKA: each layer's self-moments once.)

    resolve : callable(pair_input, params) -> PairInput
        The two layer inputs the pair really compares (e.g. a layer of another run); run on the driver.
    enabled : callable(params) -> bool
        Whether to share for these parameters; otherwise the analysis function runs once per pair.
    """

    layer_map: Callable[[LayerInput, Any], Any]
    pair_map: Callable[[PairInput, Any], Any]
    pair_reduce: Callable[[PairInput, Iterable, Any], AnalysisResult]
    resolve: Callable[[PairInput, Any], PairInput] = lambda data, params: data
    enabled: Callable[[Any], bool] = lambda params: True


def share_layer_work(**fields: Any) -> Callable[[Callable], Callable]:
    """Decorator attaching a `PairSharing` (built from `fields`) to a "layer_pair" analysis function."""
    sharing = PairSharing(**fields)

    def decorate(fn: Callable) -> Callable:
        fn.pair_sharing = sharing
        return fn

    return decorate


def _layer_key(item: LayerInput) -> tuple:
    return str(Path(item.run_path).resolve()), item.layer, tuple(item.ranges)


# ---------------------------------------------------------------------------------------------
# tasks (module-level functions so that any engine can ship them to another process)
# ---------------------------------------------------------------------------------------------
@dataclass
class Task:
    """One call of `fn(data, params)` (or `fn(data, states, params)` when `states` is set).

    `states` may be a one-shot iterator (the runner's shard reduce gets partials as they arrive).
    """

    fn: Callable
    data: Any
    params: Any
    states: Iterable | None = None


def _warning_text(caught: list[warnings.WarningMessage]) -> list[str]:
    out = []
    for item in caught:
        if issubclass(item.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        text = " ".join(str(item.message).split())
        out.append(text if issubclass(item.category, UserWarning) and item.category is UserWarning
                   else f"{item.category.__name__}: {text}")
    return out


def run_task(task: Task) -> tuple[Any, list[str]]:
    """Call the task, returning (value, warning messages raised meanwhile)."""
    with capture_warnings() as caught:  # this thread's warnings only (tasks may run on threads)
        if task.states is None:
            value = task.fn(task.data, task.params)
        else:
            value = task.fn(task.data, task.states, task.params)
    return value, _warning_text(caught)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def select_layers(run: Run, spec: str | list[str] | None) -> list[str]:
    """Run layers matched by a spec (names, globs, ranges, "all"; None = all), in the run's order."""
    return match_layers(run.layers, spec, f"run {run.path}")


def match_layers(names: list[str], spec: str | list[str] | None, holder: str) -> list[str]:
    """`names` matched by a spec, in their order; errors say what `holder` ("run PATH") holds."""
    from ..models.layerspec import abbreviate, expand_ranges, match, split_spec

    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return names
    if not isinstance(spec, str) and len(spec) == 0:
        raise ConfigError("layers=[] selects no layer: name some (e.g. 'blocks.*'), or leave layers out for all")
    holds = ", ".join(abbreviate(names)) or "(no layers)"
    chosen: set[str] = set()
    for item in split_spec(spec):
        expanded = expand_ranges(item)
        if expanded is None:
            raise UnknownLayerError(f"bad layer range {item!r}: write ranges low-high, e.g. blocks.0-2; {holder} "
                                    f"holds: {holds}")
        # Every part of a range must exist, as when extracting: blocks.0-7 on a 3-block run is a mistake, not 0-2.
        missing = [pattern for pattern in expanded if not match(pattern, names)]
        if missing:
            part = "" if missing == [item] else f" (no {', '.join(abbreviate(missing))})"
            raise UnknownLayerError(f"layer {item!r} is not in {holder}{part}; it holds: {holds}")
        chosen.update(name for pattern in expanded for name in match(pattern, names))
    return [name for name in names if name in chosen]


def preflight(run: Run | str | Path, analysis: str, layers: str | list[str] | None = None,
              params: dict[str, Any] | Any = None, labels: str | None = None) -> None:
    """Raise now (ConfigError) what `analyze` would refuse before computing, without reading activations.

    Why: a server or a form that queues an analysis as a job should answer a mistake (one layer for a
    pair analysis, more components than rows, a perplexity above the rows, a missing label column, a
    layer with no committed rows) at once, not with a job that fails later. What only the computation
    can find is still the job's to report. `params` is a dict, or the analysis' parsed `Params`.
    """
    from .registry import Params

    run = run if isinstance(run, Run) else open_run(Path(run))
    spec = get_analysis(analysis)
    model = params if isinstance(params, Params) else spec.parse_params(params or {})
    chosen = select_layers(run, layers)
    units = build_units(run, spec, chosen, _labels_column(run, spec, labels, []), 4096, model)
    for data in units.values():
        for item in _unit_layers(data):
            if item.n_rows == 0:
                raise ConfigError(f"layer {item.layer} has no committed rows yet: wait for the extraction to "
                                  "write its first shard")
        if spec.check is not None:
            spec.check(data, model)


def committed_ranges(run: Run, layer: str) -> tuple[tuple[int, int], ...]:
    """Row ranges of `layer` held by committed shards (the whole layer once the run is complete)."""
    return merge_ranges([tuple(shard.rows) for shard in run.shards(layer)])


def _labels_column(run: Run, spec: AnalysisSpec, labels: str | None, notes: list[str]) -> str | None:
    if labels is None and not spec.needs_labels:
        return None
    columns = [c for c in run.prompt_columns if c not in ("sample_id", "text")]
    shown = ", ".join(columns) or "(none: the prompts had no label columns)"
    if labels is None:
        if spec.needs_labels:
            raise ConfigError(f"analysis {spec.name} needs a label column: pass --labels COLUMN "
                              f"(labels=...); run {run.path} has label columns: {shown}")
        return None
    if labels not in run.prompt_columns or labels == "sample_id":
        raise ConfigError(f"label column {labels!r} is not in run {run.path}'s prompts; label columns: {shown}")
    if not spec.uses_labels:
        notes.append(f"analysis {spec.name} does not use labels; --labels {labels} is ignored")
        return None
    return labels


def _row_space(run: Run, layer: str) -> tuple[bool, int]:
    info = run.layer_info(layer)
    return bool(info.per_token), run.n_rows(layer)


def build_units(run: Run, spec: AnalysisSpec, layers: list[str], labels: str | None,
                batch_size: int, params: Any = None) -> dict[str, Any]:
    """unit name -> LayerInput | PairInput | RunInput over the committed rows (`params` decide callable `pairs`)."""

    def layer_input(layer: str, ranges) -> LayerInput:
        return LayerInput(run.path, run.manifest, layer, ranges, labels, batch_size)

    if spec.scope == "layer":
        return {layer: layer_input(layer, committed_ranges(run, layer)) for layer in layers}
    if spec.scope == "layer_pair":
        mode = spec.pair_mode(params)
        if len(layers) < 2 and mode != "ordered":
            raise ConfigError(f"analysis {spec.name} compares layers: select at least 2 (got {', '.join(layers)}); "
                              "use --layers with a glob such as 'blocks.*'")
        pairs = {"consecutive": lambda: list(zip(layers, layers[1:])),
                 "ordered": lambda: list(itertools.product(layers, layers)),
                 "all": lambda: list(itertools.combinations(layers, 2))}[mode]()
        units = {}
        for first, second in pairs:
            if _row_space(run, first) != _row_space(run, second):
                raise ConfigError(f"layers {first} and {second} have different rows (per-token vs per-sample, or "
                                  f"{run.n_rows(first)} vs {run.n_rows(second)}); compare layers stored alike")
            shared = intersect_ranges(committed_ranges(run, first), committed_ranges(run, second))
            units[f"{first}|{second}"] = PairInput(layer_input(first, shared), layer_input(second, shared))
        return units
    groups: dict[tuple[bool, int], tuple] = {}
    for layer in layers:
        key = _row_space(run, layer)
        ranges = committed_ranges(run, layer)
        groups[key] = ranges if key not in groups else intersect_ranges(groups[key], ranges)
    inputs = {layer: layer_input(layer, groups[_row_space(run, layer)]) for layer in layers}
    return {"run": RunInput(run.path, run.manifest, inputs, labels)}


# Below this many rows an analysis still runs, but its artifact says the numbers are not to be trusted.
FEW_ROWS = 10


def _unit_layers(data: Any) -> list[LayerInput]:
    if isinstance(data, LayerInput):
        return [data]
    if isinstance(data, PairInput):
        return [data.first, data.second]
    return list(data.layers.values())


def _shard_hashes(run: Run, units: dict[str, Any]) -> list[str]:
    hashes = set()
    for data in units.values():
        for item in _unit_layers(data):
            for shard in run.shards(item.layer):
                if intersect_ranges(item.ranges, ((shard.rows[0], shard.rows[1]),)):
                    hashes.add(f"{item.layer}:{shard.rows[0]}-{shard.rows[1]}:{shard.sha256}")
    return sorted(hashes)


def is_current(run: Run, artifact: Artifact) -> bool | None:
    """Whether `artifact` was computed on exactly the shards `run` holds now (None: cannot tell).

    Readers that show an artifact's numbers as the layer's exact values need this: a run that was
    still running (or was resumed) when the analysis ran has gained shards since, and the artifact
    describes only its earlier rows. The artifact's id is recomputed (`artifact_id`) from what it
    records in params.json (analysis, version, params, layers, labels) and the shards `analyze`
    would read now (`build_units` + `_shard_hashes`); it is current when the ids agree. For a
    cross-run analysis (cka's ``other_run``) only this run's shards are checked. False also for
    an artifact naming a layer the run no longer holds; None for one that is not a registered
    analysis of the run's shards (a plugin that is not installed, a model intervention).
    """
    import json

    from ..errors import NeuronMapError
    from .artifacts import PARAMS_NAME

    try:
        doc = json.loads((artifact.path / PARAMS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    result = artifact.result
    try:
        spec = get_analysis(doc.get("analysis", artifact.analysis))
    except NeuronMapError:
        return None
    if spec.scope not in UNIT_COLUMN:
        return None
    try:
        stored = doc.get("params", result.get("params") or {})
        layers = list(doc.get("layers", result.get("layers") or []))
        labels = doc.get("labels", result.get("labels"))
        if any(layer not in run.layers for layer in layers):
            return False
        # The params were validated when the artifact was made; constructing them again without
        # validation keeps a relative other_run path or a since-moved run from failing the check.
        model = spec.params.model_construct(**{k: v for k, v in stored.items() if k in spec.params.model_fields})
        units = build_units(run, spec, layers, labels, 4096, model)
        the_id = artifact_id(spec.name, doc.get("version", spec.version), stored, layers, labels,
                             _shard_hashes(run, units))
    except (NeuronMapError, KeyError, TypeError, ValueError):
        return False
    return the_id == artifact.id


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------
def analyze(run: str | os.PathLike | Run, analysis: str, layers: str | list[str] | None = None,
            params: dict[str, Any] | None = None, labels: str | None = None, engine: str | Engine = "local",
            force: bool = False, batch_size: int = 4096, **param_values: Any) -> Artifact:
    """Compute (or reuse) `analysis` over `run` and return its artifact.

    Parameters
    ----------
    run : path or Run
    analysis : str
        A registered name (`list_analyses()`, `neuronmap analyze --list`).
    layers : str or list of str, optional
        Layer spec over the run's layers (names, globs, ranges); all layers when None.
    params : dict, optional
        Analysis parameters (also accepted as keyword arguments).
    labels : str, optional
        prompts.parquet column with a label per sample.
    engine : "local", "ray" or an Engine
    force : bool
        Recompute even when the artifact exists.
    batch_size : int
        Rows per streamed batch.

    Returns
    -------
    Artifact
        `.reused` tells whether it was found rather than computed. Warnings (constant neurons, a run
        still running, ...) are recorded in it and also raised as `UserWarning`s.
    """
    started = time.perf_counter()
    from ..store.remote import RemoteRun, is_remote

    if is_remote(run) and not isinstance(run, Run):
        run = open_run(run)
    if isinstance(run, RemoteRun):  # analyses read shards as files: fetch them all (sha256-checked) first
        run = run.local_copy()
    run = open_run(run.path if isinstance(run, Run) else Path(run))  # reopen: the latest manifest
    if not isinstance(analysis, str):
        raise ConfigError(f"analysis={analysis!r} must be a name; see `neuronmap analyze --list`")
    spec = get_analysis(analysis)
    model = spec.parse_params({**(params or {}), **param_values})
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
    runner = get_engine(engine)
    chosen = select_layers(run, layers)
    notes: list[str] = []
    label_column = _labels_column(run, spec, labels, notes)
    units = build_units(run, spec, chosen, label_column, batch_size, model)
    for name, data in units.items():
        for item in _unit_layers(data):
            if item.n_rows == 0:
                raise ConfigError(f"layer {item.layer} has no committed rows yet (run status {run.status}); "
                                  "wait for the extraction to write its first shard")
    partial = any(item.n_rows < item.n_rows_total for data in units.values() for item in _unit_layers(data))
    if partial or run.status != "complete":
        counts = sorted({f"{item.n_rows} of {item.n_rows_total} rows"
                         for data in units.values() for item in _unit_layers(data)})
        notes.append(f"run {run.path} is {run.status}: analysed its committed part ({'; '.join(counts)}); "
                     "re-run the analysis when the extraction has completed for the full result")
    fewest = min(item.n_rows for data in units.values() for item in _unit_layers(data))
    if fewest < FEW_ROWS:
        notes.append(f"only {fewest} rows: too few samples for these numbers to mean much (linear CKA of 2 rows is "
                     "1 whatever the layers, and a second principal axis of 2 rows is noise); extract more prompts")

    params_doc = {"analysis": spec.name, "version": spec.version, "params": model.model_dump(mode="json"),
                  "layers": chosen, "labels": label_column, "shards": _shard_hashes(run, units)}
    the_id = artifact_id(spec.name, spec.version, params_doc["params"], chosen, label_column, params_doc["shards"])
    params_doc["id"] = the_id
    existing = None if force else find_artifact(run.path, the_id)
    if existing is not None:
        existing.reused = True
        existing.extra_warnings = [note for note in notes if note not in existing.warnings]
        _emit(existing.warnings)
        return existing

    if spec.check is not None:
        for data in units.values():
            spec.check(data, model)
    results, messages = _compute(spec, model, units, runner)
    artifact = _store(run, spec, model, units, results, notes + messages, params_doc, the_id, runner, partial,
                      time.perf_counter() - started, force)
    _emit(artifact.warnings)
    return artifact


def _compute(spec: AnalysisSpec, params: Any, units: dict[str, Any], engine: Engine) -> tuple[list, list[str]]:
    messages: list[str] = []

    def note(unit: str, caught: list[str]) -> None:
        messages.extend(text if unit in text or unit == "run" else f"{unit}: {text}" for text in caught)

    sharing = getattr(spec.func, "pair_sharing", None) if spec.scope == "layer_pair" else None
    if sharing is not None and sharing.enabled(params):
        return _compute_shared(sharing, params, units, engine, note), messages
    if spec.shard_map is None:
        outcomes = engine.map(run_task, [Task(spec.func, data, params) for data in units.values()])
        for unit, (_, caught) in zip(units, outcomes):
            note(unit, caught)
        return [value for value, _ in outcomes], messages
    shards = {name: data.shard_inputs() for name, data in units.items()}
    flat = [Task(spec.shard_map, part, params) for parts in shards.values() for part in parts]
    outcomes = _imap(engine, run_task, flat)
    try:
        return _reduce_units(spec, params, units, shards, outcomes, note), messages
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:  # an engine's iterator holding tasks in flight cancels them
            close()


def _reduce_units(spec: AnalysisSpec, params: Any, units: dict[str, Any], shards: dict[str, list],
                  outcomes: Iterator, note: Callable[[str, list[str]], None]) -> list:
    """shard_reduce per unit, fed its partials one at a time as `outcomes` delivers them."""
    results = []
    for name, data in units.items():
        def arriving(name: str = name, count: int = len(shards[name])) -> Iterator[Any]:
            # the unit's partials, one at a time as the engine delivers them, in row order
            for _ in range(count):
                state, caught = next(outcomes)
                note(name, caught)
                yield state

        states = arriving()
        value, caught = run_task(Task(spec.shard_reduce, data, params, states))
        for _ in states:  # a reduce that stopped early must not shift the next unit's partials
            pass
        note(name, caught)
        results.append(value)
    return results


def _compute_shared(sharing: PairSharing, params: Any, units: dict[str, Any], engine: Engine,
                    note: Callable[[str, list[str]], None]) -> list:
    """Layer tasks once per distinct layer, pair tasks once per pair (one engine batch), reduce per pair."""
    pairs = {name: sharing.resolve(data, params) for name, data in units.items()}
    layers: dict[tuple, LayerInput] = {}
    for pair in pairs.values():
        for item in (pair.first, pair.second):
            layers.setdefault(_layer_key(item), item)
    tasks = [Task(sharing.layer_map, item, params) for item in layers.values()]
    tasks += [Task(sharing.pair_map, pair, params) for pair in pairs.values()]
    outcomes = engine.map(run_task, tasks)
    layer_states = {}
    for (key, item), (state, caught) in zip(layers.items(), outcomes):
        note(item.layer, caught)
        layer_states[key] = state
    results = []
    for (name, pair), (state, caught) in zip(pairs.items(), outcomes[len(layers):]):
        note(name, caught)
        states = [layer_states[_layer_key(pair.first)], layer_states[_layer_key(pair.second)], state]
        value, caught = run_task(Task(sharing.pair_reduce, pair, params, states))
        note(name, caught)
        results.append(value)
    return results


def _store(run: Run, spec: AnalysisSpec, params: Any, units: dict[str, Any], results: list[AnalysisResult],
           messages: list[str], params_doc: dict, the_id: str, engine: Engine, partial: bool, elapsed: float,
           force: bool) -> Artifact:
    unit_docs, arrays, tables = {}, {}, {}
    column = UNIT_COLUMN[spec.scope]
    for (name, data), result in zip(units.items(), results):
        if not isinstance(result, AnalysisResult):
            raise TypeError(f"analysis {spec.name} returned {type(result).__name__}, not AnalysisResult")
        first = _unit_layers(data)[0]
        unit_docs[name] = {"rows": first.n_rows, "rows_total": first.n_rows_total, "metrics": to_jsonable(result.metrics)}
        for key, value in result.arrays.items():
            arrays[f"{name}/{key}"] = value
        for key, frame in result.tables.items():
            frame = frame.copy()
            if column is not None:
                frame.insert(0, column, name)
            tables.setdefault(key, []).append(frame)
    result_doc = {
        "id": the_id, "analysis": spec.name, "family": spec.family, "scope": spec.scope,
        "params": params_doc["params"], "layers": params_doc["layers"], "labels": params_doc["labels"],
        "run": {"path": str(run.path), "status": run.status, "partial": partial, "n_samples": run.manifest.n_samples},
        "units": unit_docs, "warnings": list(dict.fromkeys(messages)), "engine": getattr(engine, "name", "custom"),
        "created": now_iso(), "elapsed_s": round(elapsed, 3), "neuronmap_version": neuronmap_version(),
    }
    frames = {key: pd.concat(parts, ignore_index=True) for key, parts in tables.items()}
    return write_artifact(run.path, the_id, params_doc, result_doc, arrays, frames, force=force)


def _emit(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=3)
