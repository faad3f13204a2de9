"""Reading an experiment YAML with the line of every key, so errors point at the user's text.

`read_yaml(path)` parses the file twice over one text: `yaml.compose` gives the node tree with its
marks (where each key and value starts), `yaml.safe_load` gives the plain data. `SourceMap` keeps,
for every key path (`("analyses", 2, "params", "k")`), the line it is written on and the path as
written, so that a value a profile overrode is reported where the profile wrote it
(`profiles.dev.batch_size`), not where the default was.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

Path_ = tuple  # a key path: strings (mapping keys) and ints (list positions)


def format_path(path: Iterable[Any]) -> str:
    """`("analyses", 2, "params", "k")` -> `analyses[2].params.k`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass(frozen=True)
class Place:
    """Where a key path is written: 1-based line, the path as written, and whether it holds a container."""

    line: int
    written: Path_
    container: bool


@dataclass
class SourceMap:
    """Key path -> `Place`, plus the file name errors are prefixed with."""

    name: str
    places: dict[Path_, Place] = field(default_factory=dict)

    def where(self, path: Iterable[Any]) -> tuple[int, str]:
        """(line, shown path) of `path`: the line of its longest written prefix.

        Parts past that prefix are shown when the prefix is a mapping or list (a missing key such as
        `analyses[2].name`), and dropped when it is a scalar the validator expanded (a model written
        as one string, checked as `model[0].source`).
        """
        path = tuple(path)
        for cut in range(len(path), -1, -1):
            place = self.places.get(path[:cut])
            if place is not None:
                shown = place.written + (path[cut:] if place.container else ())
                return place.line, format_path(shown)
        return 1, format_path(path)

    def error(self, path: Iterable[Any], detail: str) -> ConfigError:
        """`experiment.yaml line 12: analyses[2].params.k: must be >= 2` as a ConfigError."""
        line, shown = self.where(path)
        return ConfigError(f"{self.name} line {line}: {shown + ': ' if shown else ''}{detail}")

    def overlay(self, prefix: Path_) -> None:
        """Let the places under `prefix` (a profile) stand for the same paths without it."""
        for path, place in list(self.places.items()):
            if path[: len(prefix)] == prefix and len(path) > len(prefix):
                self.places[path[len(prefix):]] = place


def _walk(node: yaml.Node, path: Path_, places: dict[Path_, Place], name: str) -> None:
    container = isinstance(node, (yaml.MappingNode, yaml.SequenceNode))
    places.setdefault(path, Place(node.start_mark.line + 1, path, container))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{name} line {line}: {format_path(path + (key,))}: duplicate key (first written on "
                                  f"line {seen[key]}); keep one")
            seen[key] = line
            places[path + (key,)] = Place(line, path + (key,), isinstance(value_node, (yaml.MappingNode, yaml.SequenceNode)))
            _walk(value_node, path + (key,), places, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), places, name)


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], SourceMap]:
    """The experiment file's data (a mapping) and its source map; every problem is a one-line ConfigError."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"experiment file {name} does not exist; pass the path of an experiment YAML "
                          "(see examples/demo.yaml)") from None
    except IsADirectoryError:
        raise ConfigError(f"experiment file {name} is a folder; pass the path of an experiment YAML") from None
    except UnicodeDecodeError:
        raise ConfigError(f"experiment file {name} is not UTF-8 text; save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"cannot read experiment file {name}: {error.strerror or error}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        what = " ".join(str(error.problem or error.context or "invalid YAML").split())
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{name}{where}: malformed YAML: {what}{column}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{name}: malformed YAML: {' '.join(str(error).split())}") from None
    if node is None or data is None:
        raise ConfigError(f"{name} is empty; an experiment needs at least `prompts:` and `model:` "
                          "(see examples/demo.yaml)")
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{name} line {node.start_mark.line + 1}: the experiment must be a mapping of keys "
                          f"(name:, prompts:, model:, ...), not a {type(data).__name__}")
    places: dict[Path_, Place] = {}
    _walk(node, (), places, name)
    return data, SourceMap(name, places)


class AtPath(ValueError):
    """A model-level validator's error that belongs to one key path."""

    def __init__(self, path: tuple, message: str) -> None:
        super().__init__(message)
        self.path = path


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the pydantic model found by walking `loc` from `model` (for 'unknown key' hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _model_of(fields[part].annotation)
    return list(getattr(current, "model_fields", {}) or [])


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def error_detail(error: dict, valid_fields: list[str] | None = None) -> str:
    """One pydantic error as the text after the key path: `must be >= 2 (got 1)`."""
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    given = error.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        import difflib

        key = str(error["loc"][-1]) if error.get("loc") else ""
        close = difflib.get_close_matches(key, valid_fields or [], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key; {hint}valid keys: {', '.join(valid_fields or []) or '(none)'}"
    if kind in _BOUNDS:
        symbol, name = _BOUNDS[kind]
        return f"must be {symbol} {ctx.get(name)} (got {given!r})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')} (got {given!r})"
    if kind in ("too_short", "too_long"):
        return f"must have at least {ctx.get('min_length')} item(s)" if kind == "too_short" else error.get("msg", "")
    if kind.endswith("_parsing") or kind.endswith("_type"):
        wanted = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
                  "dict": "a mapping (key: value)", "list": "a list", "model": "a mapping (key: value)"}
        noun = wanted.get(kind.split("_")[0], kind.split("_")[0])
        return f"must be {noun} (got {given!r})"
    message = str(error.get("msg", "is invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.replace(prefix, "")
    return message


def validation_error(error: ValidationError, source: SourceMap, model: type[BaseModel],
                      prefix: tuple = ()) -> ConfigError:
    first = error.errors()[0]
    loc = tuple(first.get("loc", ()))
    original = first.get("ctx", {}).get("error") if first.get("ctx") else None
    if isinstance(original, AtPath):
        loc, detail = original.path, str(original)
    else:
        detail = error_detail(first, _fields_at(model, loc[:-1]) if first.get("type") == "extra_forbidden" else None)
    more = error.error_count() - 1
    problem = source.error(prefix + loc, detail)
    if not more:
        return problem
    return ConfigError(f"{problem} (and {more} more problem{'s' if more > 1 else ''})")
