"""Checks of `RunWriter.write_shard` arguments, done before anything touches the disk.

Every mistake (a wrong shape, a missing token_index, rows that overlap a committed shard) is a
one-line ConfigError naming the value and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .manifest import Manifest, shard_relpath


@dataclass(frozen=True)
class ShardArgs:
    """Validated, cast arguments of one shard write."""

    layer: str
    index: int
    rows: tuple[int, int]
    samples: tuple[int, int]
    activations: np.ndarray
    sample_ids: np.ndarray
    token_index: np.ndarray | None
    relpath: str


def check_shard(manifest: Manifest, layer: str, shard_index: Any, rows: Any, samples: Any,
                activations: Any, sample_ids: Any, token_index: Any) -> ShardArgs:
    """Validate one shard write against the manifest; cast arrays to their stored dtypes."""
    info = manifest.layer(layer)
    index = as_index(shard_index)
    (start, end), (s0, s1) = as_range("rows", rows), as_range("samples", samples)
    n = end - start
    expected = manifest.expected_rows(layer)
    if expected is not None and end > expected:
        raise ConfigError(f"rows [{start}, {end}) of layer {layer} exceed the run's {expected} rows")
    if s1 > manifest.n_samples:
        raise ConfigError(f"samples [{s0}, {s1}) exceed the run's n_samples={manifest.n_samples}")
    if not info.per_token and n != s1 - s0:
        raise ConfigError(f"per-sample layer {layer}: rows [{start}, {end}) and samples [{s0}, {s1}) "
                          "must have equal length")
    acts = np.asarray(activations)
    if acts.shape != (n, *info.shape):
        raise ConfigError(f"activations for layer {layer} have shape {acts.shape}; rows [{start}, {end}) "
                          f"need shape {(n, *info.shape)}")
    if acts.dtype.kind not in "fiu":
        raise ConfigError(f"activations must be numbers (float16/32/64), got dtype {acts.dtype}")
    if info.per_token and token_index is None:
        raise ConfigError(f"layer {layer} is per-token: write_shard needs token_index")
    if not info.per_token and token_index is not None:
        raise ConfigError(f"layer {layer} is per-sample: pass token_index=None")
    relpath = shard_relpath(layer, index, manifest.format)
    for other in manifest.shards_of(layer):
        if other.path != relpath and other.rows[0] < end and start < other.rows[1] and n > 0:
            raise ConfigError(f"rows [{start}, {end}) of layer {layer} overlap committed shard {other.path} "
                              f"rows {list(other.rows)}")
    return ShardArgs(
        layer=layer, index=index, rows=(start, end), samples=(s0, s1),
        activations=np.ascontiguousarray(acts, dtype=info.dtype),
        sample_ids=as_vector("sample_ids", sample_ids, np.int64, n),
        token_index=None if token_index is None else as_vector("token_index", token_index, np.int32, n),
        relpath=relpath,
    )


def as_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"shard_index={value!r} must be an integer >= 0")
    return int(value)


def as_range(name: str, value: Any) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be a (start, end) pair of integers") from None
    if not 0 <= start <= end:
        raise ConfigError(f"{name}=[{start}, {end}) must satisfy 0 <= start <= end")
    return start, end


def as_vector(name: str, value: Any, dtype: type, n: int) -> np.ndarray:
    array = np.asarray(value)
    if array.shape != (n,):
        raise ConfigError(f"{name} has shape {array.shape}; expected ({n},), one per row")
    if array.size and array.dtype.kind not in "iu":
        raise ConfigError(f"{name} must be integers, got dtype {array.dtype}")
    return array.astype(dtype, copy=False)
