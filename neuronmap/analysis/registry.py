"""The registry of analyses: what `neuronmap analyze NAME` can run.

An analysis is a function registered with `@register(...)`; the decorator records its name, family,
one-line summary, a pydantic model of its parameters (defaults and constraints), its scope and
whether it needs a label column. The runner (`runner.py`) turns a run + layer spec into inputs,
calls the function once per unit of its scope, and stores what it returns as an artifact.

Scopes and what the function receives (see `inputs.py`):

- ``"layer"``: ``fn(data: LayerInput, params) -> AnalysisResult``, once per selected layer;
- ``"layer_pair"``: ``fn(data: PairInput, params)``, once per pair of selected layers (``pairs="all"``:
  every unordered pair i < j; ``"consecutive"``: (l0, l1), (l1, l2), ...; ``"ordered"``: every (li, lj),
  i == j included, for comparisons whose two sides differ, such as a layer against another run's; or a
  callable ``pairs(params)`` returning one of those names when the parameters decide);
- ``"run"``: ``fn(data: RunInput, params)``, once for the whole selection.

Built-in analyses live in ``neuronmap/analysis/builtin/<family>.py``; every module there is imported
the first time the registry is read, so adding a family is adding a file. Other packages register
theirs through the entry-point group ``neuronmap.analyses`` (the entry point names a module to import).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError

Scope = Literal["layer", "layer_pair", "run"]
SCOPES = ("layer", "layer_pair", "run")
PAIRS = ("all", "consecutive", "ordered")
PLUGIN_GROUP = "neuronmap.analyses"


class Params(BaseModel):
    """Base class of parameter models: unknown keys are rejected, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class AnalysisResult:
    """What an analysis function returns for one unit (layer, layer pair or run).

    metrics : dict
        Small JSON-able values (numbers, strings, short lists) shown to users and stored in result.json.
    arrays : dict of name -> ndarray
        Stored in arrays.npz (numeric or str dtypes; no objects).
    tables : dict of name -> pandas.DataFrame
        Stored as <name>.parquet (rows of every unit concatenated, with a unit column in front).
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisSpec:
    """One registered analysis (built by `register`)."""

    name: str
    family: str
    summary: str
    params: type[BaseModel]
    scope: Scope
    func: Callable[[Any, Any], AnalysisResult]
    needs_labels: bool = False
    uses_labels: bool = False
    pairs: str | Callable[[Any], str] = "all"
    check: Callable[[Any, Any], None] | None = None
    shard_map: Callable[[Any, Any], Any] | None = None
    shard_reduce: Callable[[Any, list, Any], AnalysisResult] | None = None
    headline: tuple[str, ...] = ()
    version: str = "1"

    def parse_params(self, values: dict[str, Any] | BaseModel | None) -> BaseModel:
        """Validated parameter model; mistakes raise ConfigError in the scikit-learn style."""
        if isinstance(values, self.params):
            return values
        if isinstance(values, BaseModel):
            values = values.model_dump()
        values = dict(values or {})
        try:
            return self.params(**values)
        except ValidationError as error:
            raise ConfigError(params_error_message(self, error, values)) from None

    def pair_mode(self, params: BaseModel | None) -> str:
        """"all", "consecutive" or "ordered": `pairs`, or what `pairs(params)` returns."""
        mode = self.pairs(params) if callable(self.pairs) else self.pairs
        if mode not in PAIRS:
            raise ValueError(f"analysis {self.name}: pairs gave {mode!r}, not one of {', '.join(PAIRS)}")
        return mode

    def describe_params(self) -> list[dict[str, Any]]:
        """[{name, type, default, description}] for `neuronmap analyze --list`."""
        rows = []
        for name, info in self.params.model_fields.items():
            rows.append({"name": name, "type": _type_name(info.annotation), "default": info.get_default(call_default_factory=True),
                         "description": info.description or ""})
        return rows


def _type_name(annotation: Any) -> str:
    """`int | None`, `list[float]`, `'a' | 'b'` for --list."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


_REGISTRY: dict[str, AnalysisSpec] = {}
_LOADED = False


def register(name: str, *, family: str, summary: str, params: type[BaseModel], scope: Scope = "layer",
             needs_labels: bool = False, uses_labels: bool | None = None, pairs: str | Callable = "all",
             check: Callable | None = None, shard_map: Callable | None = None, shard_reduce: Callable | None = None,
             headline: tuple[str, ...] = (), version: str = "1") -> Callable:
    """Decorator registering ``fn(data, params) -> AnalysisResult`` as analysis `name`.

    Parameters
    ----------
    name : str
        What users type (`neuronmap analyze RUN name`); lowercase, dashes.
    family : str
        Module family ("statistics", "dimensionality", ...), shown in `--list`.
    summary : str
        One line for `--list`.
    params : pydantic model class
        Parameters with defaults and constraints (subclass `Params`); part of the artifact id.
    scope : "layer" | "layer_pair" | "run"
    needs_labels : bool
        The analysis cannot run without `--labels COLUMN`.
    uses_labels : bool, default needs_labels
        The analysis uses a label column when one is given (e.g. cluster purity).
    pairs : "all" | "consecutive" | "ordered" | callable(params) -> one of those
        Which layer pairs a "layer_pair" analysis gets: unordered pairs i < j, neighbours, or every
        ordered pair with i == j included (for comparisons whose sides differ, e.g. against another run).
    check : callable(data, params), optional
        Cheap pre-flight check on shapes (n_rows, n_features) run before any data is read; raise
        ConfigError with the value, the allowed range and the fix.
    shard_map, shard_reduce : callables, optional
        For "layer" analyses that merge partial results: ``shard_map(data, params) -> state`` runs on
        each shard's rows (a Ray task per shard with `--engine ray`), ``shard_reduce(data, states, params)
        -> AnalysisResult`` merges the states in row order. When given, `fn` is not called.
    headline : tuple of str
        Metric keys the CLI prints (default: the first scalar metrics).
    version : str
        Bump when the maths changes, so old artifacts are not reused.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} must be one of {', '.join(SCOPES)}")
    if not callable(pairs) and pairs not in PAIRS:
        raise ValueError(f"pairs={pairs!r} must be one of {', '.join(PAIRS)} or a callable of the parameters")
    if (shard_map is None) != (shard_reduce is None) or (shard_map is not None and scope != "layer"):
        raise ValueError("shard_map and shard_reduce go together, and only with scope='layer'")

    def decorate(fn: Callable) -> Callable:
        existing = _REGISTRY.get(name)
        if existing is not None and (existing.func.__module__, existing.func.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"analysis {name!r} is already registered by {existing.func.__module__}")
        _REGISTRY[name] = AnalysisSpec(
            name=name, family=family, summary=summary, params=params, scope=scope, func=fn,
            needs_labels=needs_labels, uses_labels=needs_labels if uses_labels is None else uses_labels,
            pairs=pairs, check=check, shard_map=shard_map, shard_reduce=shard_reduce, headline=tuple(headline),
            version=version)
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove an analysis (tests use it to clean up)."""
    _REGISTRY.pop(name, None)


def load_builtin() -> None:
    """Import every module of `neuronmap.analysis.builtin` and every `neuronmap.analyses` entry point."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import builtin

    for module in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"{builtin.__name__}.{module.name}")
    seen: set[str] = set()
    entries = [entry for dist in metadata.distributions() for entry in dist.entry_points if entry.group == PLUGIN_GROUP]
    for entry in entries:
        if entry.name in seen:
            continue
        seen.add(entry.name)
        try:
            entry.load()
        except Exception as error:  # a broken plugin must not break the built-in analyses
            warnings.warn(f"analysis plugin {entry.name!r} ({entry.value}) failed to load: {error}", UserWarning,
                          stacklevel=2)


def list_analyses() -> list[AnalysisSpec]:
    """Every registered analysis, sorted by family then name."""
    load_builtin()
    return sorted(_REGISTRY.values(), key=lambda spec: (spec.family, spec.name))


def get_analysis(name: str) -> AnalysisSpec:
    """The analysis called `name`; ConfigError listing the valid names (closest first) otherwise.

    A built-in analysis imports only its own module (`builtin.MODULES`); anything else loads every
    module and plugin first.
    """
    key = str(name).lower().replace("_", "-")
    spec = _REGISTRY.get(name) or _REGISTRY.get(key)
    if spec is None and not _LOADED:
        from .builtin import MODULES

        if key in MODULES:
            importlib.import_module(f"{__package__}.builtin.{MODULES[key]}")
            spec = _REGISTRY.get(key)
    if spec is None:
        load_builtin()
        spec = _REGISTRY.get(name) or _REGISTRY.get(key)
    if spec is None:
        names = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown analysis {name!r}; {hint}available: {', '.join(names)} "
                          "(see `neuronmap analyze --list`)")
    return spec


def params_error_message(spec: AnalysisSpec, error: ValidationError, values: dict[str, Any]) -> str:
    """One line in the scikit-learn style: the parameter, its value, what is allowed, where to look."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ())]
    key = location[0] if location else ""
    kind, context = first.get("type", ""), first.get("ctx", {}) or {}
    value = values.get(key, first.get("input"))
    valid = ", ".join(spec.params.model_fields)
    if kind == "extra_forbidden":
        return f"unknown parameter {key!r} for analysis {spec.name}; valid parameters: {valid or '(none)'}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(context.values()))
        detail = f"must be {bounds[kind]} {limit}"
    elif kind == "literal_error":
        detail = f"must be one of {context.get('expected', '')}"
    elif kind.endswith("_parsing") or kind.endswith("_type"):
        detail = f"must be {kind.split('_')[0].replace('int', 'an integer').replace('float', 'a number')}"
    else:
        detail = first.get("msg", "is invalid").replace("Value error, ", "")
    name = key or "parameters"
    shown = f"{name}={value!r}" if key else name
    return f"{shown} {detail} (analysis {spec.name}; see `neuronmap analyze --list`)"
