"""Staging a prompt source as a run's prompt table in bounded memory.

Why: held as one pandas frame, plus its list of texts, a prompt file was most of what an
extraction's memory grew by with its number of prompts (~0.6 KiB a short question; far more for
documents). Staging reads the source a chunk at a time (`iter_prompts`), writes each chunk as a
Parquet part, then joins the parts into one `prompts.parquet` under one schema (a label column read
as ints in one chunk and floats in another becomes floats, as pandas would have made it). What the
run needs from the table afterwards (row count, `prompt_source_hash`, texts to tokenise, a shard's
sample ids) is read back from that file a row group or a column at a time. The run's writer then
adopts the file by a rename (`RunWriter.adopt_prompts`).

The staging folder sits beside the run folder (same filesystem, so the rename is atomic) and is
removed when extraction ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from glob import escape as glob_escape
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError
from .prompts import as_text, hash_prompt_columns, iter_prompts, warn_mixed_label
from .tempfiles import alive

STAGING_MARK = ".staging-"
CHUNK_ROWS = 8192  # prompts read, checked and written at a time: a few MB of short questions


@dataclass(frozen=True)
class StagedPrompts:
    """A prompt table written to `path` (``sample_id, text, *labels``), with what runs need of it."""

    path: Path
    n_samples: int
    source_hash: str  # prompt_source_hash of the table, for the manifest
    columns: tuple[str, ...]

    def text_batches(self, rows: int = 1024) -> Iterator[list[str]]:
        """The texts in row order, `rows` at a time (only the `text` column is read)."""
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=rows, columns=["text"]):
            yield batch.column(0).to_pylist()


def read_texts(path: str | os.PathLike, start: int, stop: int) -> list[str]:
    """The texts of rows `start..stop-1` of a stored prompt table, reading only the row groups that
    hold them (a shard's prompts, for engines that hand texts to workers)."""
    handle = pq.ParquetFile(path)
    texts: list[str] = []
    first = 0
    for group in range(handle.num_row_groups):
        size = handle.metadata.row_group(group).num_rows
        if first < stop and first + size > start:
            column = handle.read_row_group(group, columns=["text"]).column(0)
            texts += column.slice(max(start - first, 0), min(stop, first + size) - max(start, first)).to_pylist()
        first += size
        if first >= stop:
            break
    return texts


@contextlib.contextmanager
def staging_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A new hidden folder beside the run folder `out`, deleted on exit.

    Its name carries this host and process id (`.<run>.staging-<host>-<pid>-XXXX`), so the folder of
    a process killed outright (SIGKILL, OOM) is recognised and removed by the next extraction into the
    same parent folder on the same host, whatever run it was for (a run without `--out` is named after
    the time it planned, so its staging folder's run name is never asked for again). A live process's
    folder, or another host's, is left alone.
    """
    from .store.manifest import storage_error

    out = Path(out)
    host = _host()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out, host)
        # the run's name cut short: a name near the filesystem's 255 bytes must not fail here, in a folder
        # the user never asked for, when the run folder itself can be made
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}{STAGING_MARK}{host}-{os.getpid()}-",
                                       dir=out.parent))
    except OSError as error:
        raise storage_error(error, out) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _host() -> str:
    """This machine's name, safe in a file name."""
    import socket

    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:64] or "host"


def _remove_abandoned(out: Path, host: str) -> None:
    """Delete the staging folders beside `out` that dead processes of this host left."""
    mark = f"{STAGING_MARK}{host}-"
    for folder in out.parent.glob(f".*{glob_escape(mark)}*"):
        pid = folder.name.rpartition(mark)[2].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)




def stage_prompts(source: Any, folder: str | os.PathLike, text_column: str | None = None,
                  chunk_rows: int | None = None, on_rows: Callable[[int], None] | None = None) -> StagedPrompts:
    """Write the prompt table of `source` to `folder`/prompts.parquet, reading `chunk_rows` at a time
    (default `CHUNK_ROWS`); `on_rows(n)` is called after each chunk of n rows (a progress bar).

    Raises PromptFileError for a bad source (as `load_prompts` does), ConfigError when a column
    cannot be stored in Parquet, StorageError when the folder cannot be written.
    """
    from .store.manifest import PROMPTS_NAME, storage_error

    folder = Path(folder)
    target = folder / PROMPTS_NAME
    parts: list[Path] = []
    schemas: list[pa.Schema] = []
    n_samples = 0
    try:
        for chunk in iter_prompts(source, text_column=text_column, chunk_rows=chunk_rows or CHUNK_ROWS):
            table = _to_arrow(chunk)
            part = folder / f"part-{len(parts):05d}.parquet"
            pq.write_table(table, part)
            parts.append(part)
            schemas.append(table.schema)
            n_samples += table.num_rows
            if on_rows is not None:
                on_rows(table.num_rows)
            del table
            _release_arrow_memory()
        if len(parts) == 1:
            os.replace(parts[0], target)
        else:
            _join(parts, _unified(schemas), target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    except OSError as error:
        raise storage_error(error, target) from None
    finally:
        for part in parts:
            with contextlib.suppress(OSError):
                part.unlink()
    names = tuple(pq.ParquetFile(target).schema_arrow.names)
    return StagedPrompts(target, n_samples, _stored_hash(target, n_samples), names)


def _to_arrow(chunk: Any) -> pa.Table:
    try:
        return pa.Table.from_pandas(chunk, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ConfigError(f"prompts cannot be stored as Parquet: {' '.join(str(error).split())}") from None


def _unified(schemas: list[pa.Schema]) -> pa.Schema:
    """The schema every part is cast to: the first one's (pandas metadata kept) when all agree, else
    each column's types joined (ints and floats make floats); a column whose types cannot be joined
    (numbers in one chunk, words in another) becomes text, as `prompts.iter_prompts` does within a chunk."""
    plain = [schema.remove_metadata() for schema in schemas]
    if all(schema.equals(plain[0]) for schema in plain):
        return schemas[0]
    try:
        return pa.unify_schemas(plain, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    names = list(dict.fromkeys(name for schema in plain for name in schema.names))
    fields = []
    for name in names:
        types = [schema.field(name) for schema in plain if name in schema.names]
        try:
            fields.append(pa.unify_schemas([pa.schema([field]) for field in types], promote_options="permissive")
                          .field(name))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            if name in ("sample_id", "text"):
                raise ConfigError(f"prompts cannot be stored as Parquet: column {name!r} changes type between "
                                  "rows") from None
            warn_mixed_label(name, sorted({str(field.type) for field in types}))
            fields.append(pa.field(name, pa.string()))
    return pa.schema(fields)


def _join(parts: list[Path], schema: pa.Schema, target: Path) -> None:
    """Concatenate the parts into `target`, one part in memory at a time."""
    with pq.ParquetWriter(target, schema) as writer:
        for part in parts:
            table = pq.read_table(part)
            columns = [_cast(table.column(field.name), field.type) if field.name in table.column_names
                       else pa.nulls(table.num_rows, field.type) for field in schema]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
            del table, columns
            _release_arrow_memory()


def _cast(column: pa.ChunkedArray, to: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """`column` as `to`; to text by Python's `str` of each value, as `prompts.as_text` does within a
    chunk (Arrow's own cast writes 1.0 as "1"), so a table is the same however it was chunked."""
    if to == pa.string() and column.type not in (pa.string(), pa.large_string(), pa.null()):
        return pa.array(as_text(column.to_pylist()).tolist(), pa.string())
    return column.cast(to)


def _release_arrow_memory() -> None:
    """Hand freed Arrow buffers back to the system: Arrow's allocator keeps them for reuse, which made
    staging's footprint grow with the number of chunks (tens of MB at 100,000 prompts)."""
    pa.default_memory_pool().release_unused()


def _stored_hash(path: Path, n_samples: int) -> str:
    """prompt_source_hash of the stored table, read a column and a row group at a time."""
    handle = pq.ParquetFile(path)
    others = [name for name in handle.schema_arrow.names if name not in ("sample_id", "text")]

    def values(name: str) -> Iterator[list[Any]]:
        for group in range(handle.num_row_groups):
            yield handle.read_row_group(group, columns=[name]).column(0).to_pandas().tolist()

    return hash_prompt_columns(n_samples, others, values)
