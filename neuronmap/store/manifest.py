"""The run manifest: what a run holds and which shards are committed.

`manifest.json` is the single source of truth of a run. A shard exists for a reader only once its
`ShardRecord` is in the manifest, and the manifest is only ever replaced atomically (temp file,
fsync, rename), so a reader or a resuming writer never sees a half-written state.

Layer names are canonical names (`blocks.3.mlp`) or raw module paths (`module:transformer.h.0`);
on disk each layer gets a reversible, filesystem-safe folder name (`layer_dirname`), while the
manifest keeps the true name.
"""

from __future__ import annotations

import json
import math
import os
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RunFormatError, StorageError, UnknownLayerError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROMPTS_NAME = "prompts.parquet"
ACTIVATIONS_DIR = "activations"
TMP_MARKER = ".tmp-"
FORMATS = ("hdf5", "parquet")
SHARD_SUFFIX = {"hdf5": ".h5", "parquet": ".parquet"}
STORAGE_DTYPES = ("float16", "float32", "float64")


def now_iso() -> str:
    """Current UTC time as an ISO-8601 string (what `created`/`updated` hold)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def neuronmap_version() -> str:
    """`neuronmap.__version__`, else the installed distribution's version, else "unknown"."""
    try:
        from .. import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        return version("neuronmap")
    except Exception:  # not installed (source checkout)
        return "unknown"


def layer_dirname(layer: str) -> str:
    """Filesystem-safe, reversible folder name of a layer: percent-encodes all but `[A-Za-z0-9._-]`.

    `blocks.3.mlp` stays `blocks.3.mlp`; `module:transformer.h.0` becomes `module%3Atransformer.h.0`.
    `layer_from_dirname` reverses it.
    """
    if layer in ("", ".", ".."):
        raise UnknownLayerError(f"layer name {layer!r} cannot be stored; use a canonical name such as 'blocks.0'")
    return urllib.parse.quote(layer, safe="._-")


def layer_from_dirname(dirname: str) -> str:
    """Inverse of `layer_dirname`."""
    return urllib.parse.unquote(dirname)


def shard_relpath(layer: str, shard_index: int, format: str) -> str:
    """Path of a shard relative to the run: `activations/<layer dir>/part-NNNNN.{h5,parquet}`."""
    return f"{ACTIVATIONS_DIR}/{layer_dirname(layer)}/part-{shard_index:05d}{SHARD_SUFFIX[format]}"


class LayerInfo(BaseModel):
    """One stored layer. `shape` is the feature shape of one row (rows excluded)."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    dtype: Literal["float16", "float32", "float64"] = "float32"
    kind: Literal["hidden", "pattern"] = "hidden"
    per_token: bool = False

    @field_validator("shape")
    @classmethod
    def _positive_dims(cls, shape: list[int]) -> list[int]:
        if any(int(d) < 1 for d in shape):
            raise ValueError(f"every feature dimension must be >= 1, got shape {shape}")
        return [int(d) for d in shape]

    @property
    def size(self) -> int:
        """Number of values per row (product of `shape`)."""
        return math.prod(self.shape)


class ShardRecord(BaseModel):
    """One committed shard: rows `[start, end)` of `layer`, holding samples `[start, end)`."""

    model_config = ConfigDict(extra="forbid")

    path: str
    layer: str
    rows: tuple[int, int]
    samples: tuple[int, int]
    sha256: str
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _inside_the_run(cls, path: str) -> str:
        # A run is one self-contained folder: a shard path that leaves it (absolute, or through "..") would
        # make readers, `runs verify` and servers read files that are not the run's.
        parts = PurePosixPath(path.replace("\\", "/")).parts
        if not parts or path.startswith(("/", "\\")) or ".." in parts:
            raise ValueError(f"shard path {path!r} must be relative and inside the run folder")
        return path

    @model_validator(mode="after")
    def _ranges(self) -> "ShardRecord":
        for name, (start, end) in (("rows", self.rows), ("samples", self.samples)):
            if not 0 <= start <= end:
                raise ValueError(f"{name}=[{start}, {end}) must satisfy 0 <= start <= end")
        return self

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def index(self) -> int:
        """Shard index parsed from the file name (`part-00003.h5` -> 3)."""
        return int(Path(self.path).name.split(".")[0].split("-")[1])


class Manifest(BaseModel):
    """Contents of `<run>/manifest.json` (see DESIGN.md, "The run format")."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    status: Literal["running", "complete", "failed"] = "running"
    error: str | None = None
    model: str
    config_hash: str = ""
    tokenizer: str | None = None
    layers: dict[str, LayerInfo]
    pooling: str | None = None
    dtype: str = "float32"
    format: Literal["hdf5", "parquet"] = "hdf5"
    compression: str | None = None
    prompt_source: str | None = None
    prompt_source_hash: str | None = None
    n_samples: int = Field(ge=0)
    n_tokens: int | None = Field(default=None, ge=0)
    n_truncated: int = Field(default=0, ge=0)
    max_length: int | None = None
    shards: list[ShardRecord] = Field(default_factory=list)
    created: str = Field(default_factory=now_iso)
    updated: str = Field(default_factory=now_iso)
    neuronmap_version: str = Field(default_factory=neuronmap_version)
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def new(cls, **fields: Any) -> "Manifest":
        """Build a fresh manifest (status running, no shards); user mistakes raise ConfigError."""
        from ..errors import ConfigError

        try:
            return cls(**fields)
        except ValidationError as error:
            raise ConfigError(f"invalid run manifest: {_first_error(error)}") from None

    def layer(self, name: str) -> LayerInfo:
        """LayerInfo of `name`; UnknownLayerError listing the run's layers otherwise."""
        try:
            return self.layers[name]
        except KeyError:
            raise UnknownLayerError(
                f"layer {name!r} is not in this run; it holds: {', '.join(self.layers) or '(no layers)'}"
            ) from None

    def expected_rows(self, name: str) -> int | None:
        """Rows `name` must have when complete: n_tokens for per-token layers, else n_samples."""
        return self.n_tokens if self.layer(name).per_token else self.n_samples

    def shards_of(self, name: str) -> list[ShardRecord]:
        """The layer's committed shards, in row order."""
        self.layer(name)
        return sorted((s for s in self.shards if s.layer == name), key=lambda s: (s.rows, s.path))


def coverage_problems(manifest: Manifest) -> list[str]:
    """Every way the shards fail to cover each layer's rows exactly once (empty list: complete).

    Checks per layer: no gap, no overlap, rows end at n_samples (per-sample) or n_tokens
    (per-token); per-sample shards hold as many samples as rows; the shards' sample ranges
    cover [0, n_samples) in order. Does not touch the files (see verify_run for that).
    """
    problems: list[str] = []
    seen: set[str] = set()
    for shard in manifest.shards:
        if shard.path in seen:
            problems.append(f"shard {shard.path} is listed twice in the manifest")
        seen.add(shard.path)
        if shard.layer not in manifest.layers:
            problems.append(f"shard {shard.path} belongs to layer {shard.layer!r}, which the manifest does not list")
    for name, info in manifest.layers.items():
        expected = manifest.expected_rows(name)
        shards = manifest.shards_of(name)
        position, previous = 0, None
        for shard in shards:
            start, end = shard.rows
            if start > position:
                problems.append(f"layer {name}: rows [{position}, {start}) are in no shard")
            elif start < position:
                problems.append(
                    f"layer {name}: rows [{start}, {min(end, position)}) are in two shards ({previous.path}, {shard.path})"
                )
            position, previous = max(position, end), shard
            if not info.per_token and shard.n_rows != shard.samples[1] - shard.samples[0]:
                problems.append(f"layer {name}: per-sample shard {shard.path} has {shard.n_rows} rows but samples {list(shard.samples)}")
        if expected is None:
            problems.append(f"layer {name}: n_tokens is not set, so per-token rows cannot be checked")
        elif position < expected:
            problems.append(f"layer {name}: rows [{position}, {expected}) are in no shard")
        elif position > expected:
            problems.append(f"layer {name}: shards hold rows up to {position}, but the run has {expected}")
        problems.extend(_sample_problems(name, shards, manifest.n_samples))
    return problems


def _sample_problems(name: str, shards: list[ShardRecord], n_samples: int) -> list[str]:
    spans = [s.samples for s in shards if s.samples[1] > s.samples[0]]
    position = 0
    for start, end in spans:
        if start > position:
            return [f"layer {name}: samples [{position}, {start}) are in no shard"]
        if end < position:
            return [f"layer {name}: shard samples are out of row order at samples [{start}, {end})"]
        position = end
    if position != n_samples:
        return [f"layer {name}: shards cover samples [0, {position}), the run has {n_samples}"]
    return []


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "manifest"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def load_manifest(run: str | os.PathLike) -> Manifest:
    """Read and validate `<run>/manifest.json`; every failure is a one-line RunFormatError."""
    run = Path(run)
    if not run.is_dir():
        what = "is a file, not a run folder" if run.exists() else "does not exist"
        raise RunFormatError(f"run folder {str(run)!r} {what}; pass a folder written by `neuronmap extract`")
    path = run / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFormatError(f"{str(run)!r} has no {MANIFEST_NAME}: it is not a NeuronMap run") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFormatError(f"cannot read {path}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunFormatError(
            f"{path} is not valid JSON ({error.msg.removesuffix(' at')} at line {error.lineno}); the run is corrupt, "
            "re-extract with --overwrite"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("schema_version"), int) and data["schema_version"] > SCHEMA_VERSION:
        raise RunFormatError(
            f"{path} has schema_version {data['schema_version']}, this neuronmap reads {SCHEMA_VERSION}; upgrade neuronmap"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise RunFormatError(f"{path} is not a valid run manifest: {_first_error(error)}; restore it from a backup or "
                             "extract the run again with --overwrite") from None


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def storage_error(error: OSError, path: str | os.PathLike, resumable: bool = True) -> StorageError:
    """Turn an OSError from writing `path` into a one-line StorageError that says how to go on.

    `resumable` says whether re-running picks up where this left off (extraction, conversion) or
    simply starts again (a CSV export)."""
    text = str(error)
    errno_ = getattr(error, "errno", None)
    again = "re-run the same command to resume" if resumable else "re-run the same command"
    if errno_ in (28, 122) or "No space left" in text or "errno = 28" in text or "Disk quota" in text:
        return StorageError(f"disk full while writing {path}: free space and {again}")
    if errno_ in (1, 13, 30) or "Permission denied" in text or "Read-only file system" in text:
        return StorageError(f"no permission to write {path}: choose a writable output folder (--out)")
    blocker = next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)
    if errno_ in (17, 20) and blocker is not None:
        return StorageError(f"could not write {path}: {blocker} is a file, not a folder; choose another output path")
    reason = (getattr(error, "strerror", None) or text or type(error).__name__).replace("\n", " ")
    if errno_ == 2:  # the folder cannot be made there (e.g. under /proc), or it went away
        return StorageError(f"could not write {path}: {reason}; choose another output folder (--out)")
    return StorageError(f"could not write {path}: {reason}; fix it and {again}")


def write_manifest(run: Path, manifest: Manifest) -> None:
    """Replace `<run>/manifest.json` atomically: temp file, flush + fsync, rename, fsync the folder."""
    final = run / MANIFEST_NAME
    tmp = run / f"{MANIFEST_NAME}{TMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}"
    data = manifest.model_dump_json(indent=2).encode("utf-8")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as error:
        _remove_quietly(tmp)
        raise storage_error(error, final) from None
    fsync_dir(run)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
