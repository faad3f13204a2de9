"""Leaving the run format: CSV export and HDF5 <-> Parquet conversion.

CSV floats are written with enough significant digits to round-trip exactly (float16: 5,
float32: 9, float64: 17), so `pandas.read_csv(...).astype(dtype)` gives back the stored values.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, RunExistsError
from .manifest import FORMATS, TMP_MARKER, fsync_dir, storage_error
from .reader import Run, open_run
from .shards import HDF5_COMPRESSIONS, PARQUET_COMPRESSIONS, ShardReader
from .writer import RunWriter

log = logging.getLogger(__name__)

CSV_WARN_BYTES = 100_000_000
ROUND_TRIP_FORMAT = {"float16": "%.5g", "float32": "%.9g", "float64": "%.17g"}
CHARS_PER_VALUE = {"float16": 11, "float32": 15, "float64": 23}  # digits, sign, point, exponent, comma


def export_csv(run: Run | str | os.PathLike, out: str | os.PathLike, layers: Sequence[str] | str | None = None,
               float_format: str | None = None, batch_size: int = 4096, overwrite: bool = False) -> Path:
    """Write `layers` of `run` as one CSV: one line per sample (or token), never the whole layer in memory.

    Columns: `sample_id`, `token_index` (per-token runs), then `<layer>.<i>` for each value of each
    layer, `i` the flat (C-order) index into the layer's feature shape. Warns (warnings + logging)
    when the file will exceed 100 MB. All layers must have the same rows (all per-sample or all
    per-token). An existing file at `out` is replaced only with `overwrite=True`. Every shard read is
    checked against its sha256 first. Returns the path written.
    """
    run = open_run(run, require_complete=True)
    chosen = run.layers if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    if not chosen:
        raise ConfigError(f"no layers to export; the run holds: {', '.join(run.layers)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the CSV file to write (e.g. {out / 'activations.csv'})")
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out} already exists; pass --overwrite to replace it or choose another file")
    infos = [run.layer_info(layer) for layer in chosen]
    per_token = {info.per_token for info in infos}
    n_rows = {run.n_rows(layer) for layer in chosen}
    if len(per_token) > 1 or len(n_rows) > 1:
        raise ConfigError("layers for one CSV must have the same rows; export per-token and per-sample layers separately")
    total, per_token = n_rows.pop(), per_token.pop()
    id_columns = ["sample_id", "token_index"] if per_token else ["sample_id"]
    value_columns = [f"{layer}.{i}" for layer, info in zip(chosen, infos) for i in range(info.size)]
    formats = ["%d"] * len(id_columns) + [
        float_format or ROUND_TRIP_FORMAT[info.dtype] for info in infos for _ in range(info.size)
    ]
    estimate = total * (sum(CHARS_PER_VALUE[info.dtype] * info.size for info in infos) + 8 * len(id_columns))
    if estimate > CSV_WARN_BYTES:
        message = (f"CSV export of {total} rows x {len(value_columns)} values will be about {estimate / 1e6:.0f} MB; "
                   "Parquet or HDF5 (convert_run) is smaller and faster to read")
        warnings.warn(message, stacklevel=2)
        log.warning(message)
    run.check_intact(chosen)

    tmp = out.with_name(f"{out.name}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(",".join(id_columns + value_columns) + "\n")
            for start in range(0, total, batch_size):
                end = min(total, start + batch_size)
                fh.write("" if start == end else _csv_block(run, chosen, per_token, start, end, formats))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as error:
        _remove(tmp)
        raise storage_error(error, out, resumable=False) from None
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(out.parent)
    return out


def _csv_block(run: Run, layers: list[str], per_token: bool, start: int, end: int, formats: list[str]) -> str:
    ids = run.sample_ids(layers[0], rows=(start, end))
    columns = [ids.astype(np.float64)]
    if per_token:
        columns.append(run.token_index(layers[0], rows=(start, end)).astype(np.float64))
    for layer in layers[1:]:
        if not np.array_equal(run.sample_ids(layer, rows=(start, end)), ids):
            raise ConfigError(f"layers {layers[0]} and {layer} have different rows; export them separately")
    for layer in layers:
        values = run.array(layer, rows=(start, end))
        columns.append(values.reshape(len(values), -1).astype(np.float64))
    block = np.column_stack(columns)
    line = ",".join(formats)
    return "".join(line % tuple(row) + "\n" for row in block.tolist())


def convert_run(run: Run | str | os.PathLike, out: str | os.PathLike, format: str,
                compression: str | None = None, overwrite: bool = False) -> Path:
    """Copy a complete run to `out` in `format` ("hdf5" or "parquet"), shard by shard.

    Arrays, sample ids, token indices, prompts and shard boundaries are identical; files and their
    sha256 are new. Compression defaults to the source's when `format` supports it, else none.
    An interrupted conversion resumes like an extraction. The source's shards are checked against
    their sha256 first: damage is reported, never copied with a fresh checksum. Returns `out`.
    """
    source = open_run(run, require_complete=True)
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not supported; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.resolve() == source.path.resolve():
        raise ConfigError(f"the output folder {out} is the source run; give a new folder")
    source.check_intact()
    if compression is None:
        allowed = HDF5_COMPRESSIONS if format == "hdf5" else PARQUET_COMPRESSIONS
        compression = source.manifest.compression if source.manifest.compression in allowed else None
    extra = {**source.manifest.extra, "converted_from": str(source.path)}
    manifest = source.manifest.model_copy(deep=True, update=dict(format=format, compression=compression, extra=extra))
    writer = RunWriter(out, manifest, format=format, compression=compression, overwrite=overwrite)
    try:
        writer.write_prompts(source.prompts)
        for layer in source.layers:
            info = source.layer_info(layer)
            for shard in source.shards(layer):
                if writer.committed(layer, shard.index):
                    continue
                with ShardReader(source.path / shard.path, source.format, tuple(info.shape), info.dtype) as reader:
                    tokens = reader.read("token_index") if info.per_token else None
                    writer.write_shard(layer, shard.index, rows=shard.rows, samples=shard.samples,
                                       activations=reader.read("activations"), sample_ids=reader.read("sample_id"),
                                       token_index=tokens)
        writer.complete()
    except Exception as error:
        try:
            writer.fail(f"conversion failed: {type(error).__name__}: {error}")
        except Exception:
            pass
        raise
    return out


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

