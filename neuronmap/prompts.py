"""Loading prompt sets into the run's prompt table.

`load_prompts(source)` turns a prompt source into a pandas DataFrame with the columns
`sample_id` (int64, 0..n-1 in source order), `text`, and then every other column of the source
(labels, metadata) in the source's order. That table is what a run stores as `prompts.parquet`.

Sources:

- a path to a ``.txt`` file: one prompt per line, blank lines skipped;
- a ``.jsonl`` file: one JSON object per line; the text column is ``text_column`` or the first of
  ``text, prompt, question, sentence, input`` present (exact name first, then case-insensitive);
- a ``.csv`` or ``.parquet`` file, with the same text-column rule;
- a Python list/tuple of strings, or a pandas DataFrame.

Texts lose trailing newlines (``\\n``/``\\r``) and are otherwise kept exactly as written. A source
column already called ``sample_id`` (or ``text``, when another column is the text column) is kept
as ``source_sample_id`` (``source_text``), unless it is already 0..n-1 (a frame that
load_prompts itself returned), which is kept as is.

Every problem with the source raises `PromptFileError` with a one-line message naming the file and
the fix. `prompt_source_hash(df)` fingerprints a loaded table for the run manifest.

`iter_prompts(source, chunk_rows=N)` gives the same table in chunks of at most N rows (sample ids
counting on across chunks), so a prompt file of any size can be staged into a run in bounded memory
(`neuronmap.prompt_table`); `load_prompts` is that iterator in one chunk.

`DEFAULT_PROMPTS` is the shipped prompt set (``neuronmap/data/questions.csv``): about 430
hand-written English questions and statements with the label columns ``topic``, ``question_type``,
``sentiment``, ``answer_type``, ``length_bucket`` (words: short <= 7, medium 8-15, long >= 16) and
``is_question``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from neuronmap.errors import ConfigError, PromptFileError

__all__ = [
    "DEFAULT_PROMPTS",
    "SUPPORTED_EXTENSIONS",
    "TEXT_COLUMN_CANDIDATES",
    "iter_prompts",
    "load_prompts",
    "prompt_source_hash",
]

DEFAULT_PROMPTS: Path = Path(__file__).resolve().parent / "data" / "questions.csv"
BUILTIN_PROMPTS = "builtin:questions"  # names DEFAULT_PROMPTS wherever a prompt file is asked for

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl", ".csv", ".parquet")
TEXT_COLUMN_CANDIDATES: tuple[str, ...] = ("text", "prompt", "question", "sentence", "input")

_ICONV_HINT = "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 {p} > fixed{ext}`"

PromptSource = Union[str, os.PathLike, Sequence[str], pd.DataFrame]


# ----------------------------------------------------------------------------------------------
# public API


def load_prompts(
    source: PromptSource,
    text_column: str | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Load a prompt source into a DataFrame ``[sample_id, text, *other columns]``.

    ``limit`` keeps only the first ``limit`` prompts (files are not read past them where the
    format allows). ``text_column`` picks the text column of JSONL/CSV/Parquet/DataFrame sources.
    """
    return next(iter_prompts(source, text_column=text_column, limit=limit, chunk_rows=None))


def iter_prompts(
    source: PromptSource,
    text_column: str | None = None,
    limit: int | None = None,
    chunk_rows: int | None = 65536,
) -> Iterator[pd.DataFrame]:
    """The prompt table of `source` in chunks of at most `chunk_rows` rows (None: one chunk).

    Every chunk has the columns ``[sample_id, text, *others]`` of `load_prompts`, with sample ids
    counting on from the previous chunk, and every row gets the same checks and error messages.
    Only one chunk of the file is in memory at a time. A column of a JSONL or CSV source may be
    inferred as another type in another chunk (ints, then floats); `neuronmap.prompt_table`
    unifies them when it stores the table.
    """
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit={limit!r} is invalid: pass a positive integer, or None for all prompts")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ConfigError(f"chunk_rows={chunk_rows!r} is invalid: pass a positive integer, or None for one chunk")

    if isinstance(source, pd.DataFrame):
        return _checked_first(_from_frame(source, text_column, limit, chunk_rows))
    if isinstance(source, (list, tuple)):
        return _checked_first(_from_list(source, limit, chunk_rows))

    if not isinstance(source, (str, os.PathLike)):
        raise PromptFileError(
            f"cannot read prompts from a {type(source).__name__}: pass a file path "
            f"({', '.join(SUPPORTED_EXTENSIONS)}), a list of strings or a pandas DataFrame"
        )

    if os.fspath(source).strip() == BUILTIN_PROMPTS:  # the shipped set, from any folder (as in YAML experiments)
        source = DEFAULT_PROMPTS
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise PromptFileError(f"prompt file {path} not found{where}: check the path, or pass a list of prompts")
    if path.is_dir():
        raise PromptFileError(f"prompt file {path} is a directory: pass a file ({', '.join(SUPPORTED_EXTENSIONS)})")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise PromptFileError(
            f"prompt file {path} has unsupported extension {ext or '(none)'!r}: "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)} (one prompt per line in .txt, one JSON object per line in .jsonl)"
        )

    if ext == ".txt" and text_column is not None:
        raise ConfigError(f"text_column={text_column!r} does not apply to {path}: a .txt file has one prompt per line "
                          "and no columns; leave out --text-column, or use .jsonl/.csv/.parquet")
    readers = {".txt": lambda: _from_txt(path, limit, chunk_rows),
               ".jsonl": lambda: _from_jsonl(path, text_column, limit, chunk_rows),
               ".csv": lambda: _from_csv(path, text_column, limit, chunk_rows),
               ".parquet": lambda: _from_parquet(path, text_column, limit, chunk_rows)}
    return _checked_first(readers[ext]())


def _checked_first(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Read the first chunk now, so that an empty or malformed start of the file raises at the call."""
    chunks = _storable_labels(chunks)
    first = next(chunks)
    return itertools.chain([first], chunks)


def _storable_labels(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """The chunks, with every label column whose values Arrow cannot hold in one type (numbers and
    words, say: `1, 2, "unknown"`) turned to text, with one warning per column.

    Why: such a column is common in hand-made label files, and failing the whole extraction over
    it helps nobody; as text (`str` of each value, missing kept missing) the labels stay usable
    for probing and the run stays storable. `prompt_table` applies the same rule across chunks.
    """
    import pyarrow as pa

    warned: set[str] = set()
    for chunk in chunks:
        for name in chunk.columns[2:]:
            column = chunk[name]
            if column.dtype != object:
                continue
            try:
                pa.array(column, from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                chunk[name] = as_text(column)
                if name not in warned:
                    warned.add(name)
                    warn_mixed_label(name, sorted({type(v).__name__ for v in column.tolist() if not _missing(v)}))
        yield chunk


def as_text(values: Any) -> pd.Series:
    """Each value as text, missing values (None, NaN, pd.NA) kept missing.

    A whole-number float is written as an integer (2.0 -> "2"): pandas reads a column of integers
    with a gap as floats, so without this the same label would read "2" or "2.0" depending on which
    rows were read together (the prompt table is read in chunks).
    """
    def text(value: Any) -> str | None:
        if _missing(value):
            return None
        if isinstance(value, (float, np.floating)) and float(value).is_integer() and abs(value) < 2**53:
            return str(int(value))
        return str(value)

    index = values.index if isinstance(values, pd.Series) else None
    return pd.Series([text(v) for v in values], dtype=object, index=index)


def warn_mixed_label(name: str, kinds: Sequence[str]) -> None:
    import warnings

    warnings.warn(f"label column {name!r} mixes values of types {', '.join(kinds)}; it is stored as text (give it "
                  "one type to keep numbers as numbers)", stacklevel=3)


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def prompt_source_hash(df: pd.DataFrame) -> str:
    """sha256 (hex) of a prompt table's texts and label columns, in row order.

    ``sample_id`` is left out (it is derived from the row order, which is hashed anyway); the
    other columns are hashed in sorted-name order, so reordering columns does not change the hash,
    while any change of a text, a label value or the row order does. Values are serialised
    canonically (missing -> null, numpy scalars -> Python, floats by repr), so the hash is the same
    across processes, machines and the CSV/Parquet/JSONL form of the same table. Values are taken as
    Arrow (and so a run's ``prompts.parquet``) holds them: a struct column gives every row all keys.
    """
    if "text" not in df.columns:
        raise PromptFileError("prompt table has no 'text' column: load it with neuronmap.prompts.load_prompts")
    others = [str(c) for c in df.columns if c not in ("sample_id", "text")]
    import pyarrow as pa

    try:  # hash the values as prompts.parquet will hold them, so a table hashes the same once stored
        table = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError):  # not storable as it is: hash the values themselves
        return hash_prompt_columns(len(df), others, lambda name: [df[_original_name(df, name)].tolist()])
    return hash_prompt_columns(len(df), others, lambda name: [table.column(name).to_pandas().tolist()])


def hash_prompt_columns(n_rows: int, others: Sequence[str], values: Any) -> str:
    """`prompt_source_hash` of a table given column by column: ``values(name)`` yields that column's
    values in row order, in one or more lists (a stored table is read a row group at a time)."""
    h = hashlib.sha256()
    h.update(b"neuronmap-prompts-v1\n")
    h.update(f"{n_rows}\n".encode())
    for col in ["text", *sorted(others)]:
        h.update(b"\x00col\x00" + json.dumps(col, ensure_ascii=False).encode("utf-8") + b"\n")
        for part in values(col):  # one update per part: the same bytes as one per value, far fewer calls
            h.update("".join([json.dumps(_canonical(value), ensure_ascii=False) + "\n" for value in part])
                     .encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# sources


def _chunk_bounds(n: int, chunk_rows: int | None) -> Iterator[tuple[int, int]]:
    step = chunk_rows or max(n, 1)
    return ((start, min(start + step, n)) for start in range(0, n, step))


def _from_frame(source: pd.DataFrame, text_column: str | None, limit: int | None,
                chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    df = source.reset_index(drop=True)
    if limit is not None:
        df = df.iloc[:limit]
    if len(df) == 0:
        raise PromptFileError("the DataFrame has no rows: give at least one prompt")
    col = _pick_text_column(df, text_column, "the DataFrame")
    for start, stop in _chunk_bounds(len(df), chunk_rows):
        yield _finish(df.iloc[start:stop].copy(), col, where="the DataFrame", row_label=_plain_row, picked=True,
                      start=start)


def _from_list(items: Sequence[Any], limit: int | None, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    if limit is not None:
        items = items[:limit]
    if len(items) == 0:
        raise PromptFileError("the prompt list is empty: pass at least one non-blank string")
    for start, stop in _chunk_bounds(len(items), chunk_rows):
        texts = []
        for i in range(start, stop):
            item = items[i]
            if not isinstance(item, str):
                raise PromptFileError(
                    f"the prompt list has a value of type {type(item).__name__} at index {i} ({_short(item)}): every prompt must be a string"
                )
            text = item.rstrip("\r\n")
            if not text.strip():
                raise PromptFileError(f"the prompt list has an empty prompt at index {i}: remove it or give it text")
            texts.append(text)
        yield _frame({"text": texts}, start)


def _from_txt(path: Path, limit: int | None, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    texts: list[str] = []
    n = 0
    for _lineno, line in _iter_utf8_lines(path):
        if not line.strip():
            continue
        texts.append(line)
        if limit is not None and n + len(texts) >= limit:
            break
        if chunk_rows is not None and len(texts) >= chunk_rows:
            yield _frame({"text": texts}, n)
            n, texts = n + len(texts), []
    if n == 0 and not texts:
        raise PromptFileError(f"prompt file {path} is empty (no non-blank lines): write one prompt per line")
    if texts:
        yield _frame({"text": texts}, n)


def _from_jsonl(path: Path, text_column: str | None, limit: int | None,
                chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    where = f"prompt file {path}"
    # Column-wise accumulation: one list per key, no list of per-row dicts.
    columns: dict[str, list[Any]] = {}
    linenos: list[int] = []
    start = 0  # sample id of the chunk's first row
    picked: str | None = None  # the text column, fixed by the first chunk

    def chunk() -> pd.DataFrame:
        nonlocal picked
        df = pd.DataFrame(columns, index=pd.RangeIndex(len(linenos)))
        lines = list(linenos)
        label = lambda i: f"line {lines[i - start]}"  # noqa: E731 - row labels count from the chunk's start
        if picked is None:
            picked = _pick_text_column(df, text_column, where)
        elif text_column is None and _candidate_text_column(df) not in (None, picked):
            raise PromptFileError(f"{where} line {lines[0]} onwards has a key {_candidate_text_column(df)!r} that would "
                                  f"be the text column, but earlier lines used {picked!r}: pass --text-column")
        if picked not in df.columns:  # no row of this chunk has the key: the first row is the one to fix
            df[picked] = None
        return _finish(df, picked, where=where, row_label=label, picked=True, start=start)

    n = 0
    for lineno, line in _iter_utf8_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"prompt file {path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}): "
                f"fix that line; each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise PromptFileError(
                f"prompt file {path} line {lineno} is a JSON {type(obj).__name__}, not an object: "
                f'write one object per line, e.g. {{"text": "..."}}'
            )
        rows = len(linenos)
        for key, value in obj.items():
            col = columns.get(key)
            if col is None:
                col = columns[key] = [None] * rows
            col.append(value)
        for col in columns.values():
            if len(col) <= rows:
                col.append(None)
        linenos.append(lineno)
        n += 1
        if limit is not None and n >= limit:
            break
        if chunk_rows is not None and len(linenos) >= chunk_rows:
            yield chunk()
            start += len(linenos)
            columns, linenos = {}, []
    if n == 0:
        raise PromptFileError(f"prompt file {path} is empty (no JSON objects): write one JSON object per line")
    if linenos:
        yield chunk()


def _from_csv(path: Path, text_column: str | None, limit: int | None,
              chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    where = f"prompt file {path}"
    common: dict[str, Any] = {"encoding": "utf-8", "nrows": limit}
    if chunk_rows is not None:
        common["chunksize"] = chunk_rows
    try:
        reader = pd.read_csv(path, **common)
        chunks = iter([reader]) if chunk_rows is None else iter(reader)
        first = next(chunks, None)
        if first is None:  # a header and no rows
            first = pd.read_csv(path, encoding="utf-8", nrows=0)
        if not isinstance(first.index, pd.RangeIndex):  # pandas made the extra leading fields an index
            raise PromptFileError(f"{where}: the first row has more fields than the header's {len(first.columns)} "
                                  "columns; quote fields that contain commas, or name every column in the header")
        col = _pick_text_column(first, text_column, where)
        verbatim = None  # a second reader of the text column alone, opened at the first chunk that needs it
        start = 0
        for index, df in enumerate(itertools.chain([first], chunks)):
            if verbatim is not None:
                raw = next(verbatim)
            elif not all(isinstance(v, str) for v in df[col].tolist()):
                # CSV cells are untyped: the NA/number inference that suits labels would turn prompts
                # such as "NA" into NaN and "42" into an int. Re-read just the text column verbatim.
                raw_reader = pd.read_csv(path, encoding="utf-8", nrows=limit, usecols=[col], dtype=str,
                                         keep_default_na=False, **({} if chunk_rows is None else {"chunksize": chunk_rows}))
                verbatim = iter([raw_reader]) if chunk_rows is None else iter(raw_reader)
                raw = next(itertools.islice(verbatim, index, None))
            else:
                raw = None
            if raw is not None:
                df[col] = raw[col].to_numpy(dtype=object)
            # header is line 1; multi-line quoted fields make this approximate, so say "row" first
            yield _finish(df, col, where=where, row_label=lambda i: f"row {i} (line {i + 2})", picked=True, start=start)
            start += len(df)
    except UnicodeDecodeError:
        _raise_not_utf8(path)
    except pd.errors.EmptyDataError:
        raise PromptFileError(f"{where} is empty: write a header row (e.g. `text`) and one prompt per row") from None
    except pd.errors.ParserError as e:
        msg = " ".join(str(e).split())
        raise PromptFileError(f"{where} is not valid CSV ({msg}): fix that row, quoting fields that contain commas") from None


def _from_parquet(path: Path, text_column: str | None, limit: int | None,
                  chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"prompt file {path}"
    col = None
    start = 0
    try:
        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows == 0:
            raise PromptFileError(f"{where} is empty (0 rows): write at least one prompt row")
        named_range = _named_range_index(pf)
        for table in _parquet_tables(pf, limit, chunk_rows):
            df = table.to_pandas()
            if named_range is not None and (chunk_rows, limit) != (None, None):  # metadata only: rebuild this part
                name, first, step = named_range
                df.index = pd.RangeIndex(first + step * start, first + step * (start + len(df)), step, name=name)
            # A named index saved by pandas is data (e.g. an id column): keep it; an unnamed one is not.
            df = df.reset_index(drop=all(name is None for name in df.index.names))
            if col is None:
                col = _pick_text_column(df, text_column, where)
            yield _finish(df, col, where=where, row_label=_plain_row, picked=True, start=start)
            start += len(df)
    except (pa.ArrowException, OSError) as e:
        msg = " ".join(str(e).split())
        raise PromptFileError(f"{where} is not a readable Parquet file ({msg}): re-export it, e.g. with pandas.DataFrame.to_parquet") from None


def _named_range_index(pf: Any) -> tuple[str, int, int] | None:
    """(name, start, step) of a named RangeIndex that pandas saved as metadata only, not as a column.

    A whole-file read rebuilds it from the metadata; a batch read cannot, so chunks rebuild their part.
    """
    metadata = (pf.schema_arrow.metadata or {}).get(b"pandas")
    if not metadata:
        return None
    try:
        indexes = json.loads(metadata).get("index_columns", [])
    except (ValueError, AttributeError):
        return None
    if len(indexes) == 1 and isinstance(indexes[0], dict) and indexes[0].get("kind") == "range" \
            and indexes[0].get("name") is not None:
        return str(indexes[0]["name"]), int(indexes[0]["start"]), int(indexes[0]["step"])
    return None


def _parquet_tables(pf: Any, limit: int | None, chunk_rows: int | None) -> Iterator[Any]:
    """Tables of at most `chunk_rows` rows (None: one table), stopping after `limit` rows."""
    import pyarrow as pa

    if chunk_rows is None and limit is None:
        yield pf.read()
        return
    pending = []
    got = 0
    for batch in pf.iter_batches(batch_size=min(chunk_rows or 65536, limit or 65536)):
        if limit is not None:
            batch = batch.slice(0, limit - got)
        got += batch.num_rows
        if chunk_rows is None:
            pending.append(batch)
        else:
            yield pa.Table.from_batches([batch], schema=pf.schema_arrow)
        if limit is not None and got >= limit:
            break
    if chunk_rows is None:
        yield pa.Table.from_batches(pending, schema=pf.schema_arrow)


# ----------------------------------------------------------------------------------------------
# helpers


def _iter_utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its trailing newline), decoding strictly as UTF-8."""
    offset = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PromptFileError(f"prompt file {path} cannot be read ({e.strerror}): check its permissions") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _raise_not_utf8(path, offset + e.start)
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            offset += len(raw)
            yield lineno, line.rstrip("\r\n")


def _raise_not_utf8(path: Path, offset: int | None = None) -> None:
    if offset is None:
        offset = _first_bad_utf8_offset(path)
    at = f" (first bad byte at offset {offset})" if offset is not None else ""
    raise PromptFileError(
        f"prompt file {path} is not UTF-8{at}: " + _ICONV_HINT.format(p=path, ext=path.suffix)
    ) from None


def _first_bad_utf8_offset(path: Path, chunk_size: int = 1 << 20) -> int | None:
    """Byte offset of the first byte that is not valid UTF-8, scanning in chunks; None if none."""
    base = 0  # file offset of data[0]
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            final = not chunk
            data = carry + chunk
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                if final or e.end != len(data) or e.reason != "unexpected end of data":
                    return base + e.start
                # a multi-byte character cut by the chunk boundary: finish it with the next chunk
                carry = data[e.start:]
                base += e.start
                continue
            if final:
                return None
            base += len(data)
            carry = b""


def _pick_text_column(df: pd.DataFrame, text_column: str | None, where: str) -> str:
    cols = [str(c) for c in df.columns]
    present = ", ".join(repr(c) for c in cols) or "(none)"
    if text_column is not None:
        if text_column in df.columns:
            return text_column
        lowered = [c for c in cols if c.lower() == text_column.lower()]
        hint = f" (did you mean {lowered[0]!r}?)" if lowered else ""
        raise PromptFileError(
            f"{where} has no column {text_column!r}{hint}; columns present: {present}: pass one of them with --text-column"
        )
    found = _candidate_text_column(df)
    if found is not None:
        return found
    raise PromptFileError(
        f"{where} has no text column (looked for {', '.join(TEXT_COLUMN_CANDIDATES)}); "
        f"columns present: {present}: pass the one holding the prompts with --text-column"
    )


def _candidate_text_column(df: pd.DataFrame) -> Any:
    """The column the text-column rule picks when none is named (exact name first), or None."""
    for cand in TEXT_COLUMN_CANDIDATES:
        if cand in df.columns:
            return cand
    for cand in TEXT_COLUMN_CANDIDATES:
        for c in df.columns:
            if str(c).lower() == cand:
                return c
    return None


def _finish(df: pd.DataFrame, text_column: str | None, *, where: str, row_label, picked: bool = False,
            start: int = 0) -> pd.DataFrame:
    """Check and clean one chunk of a source; `start` is the sample id of its first row."""
    if len(df) == 0:
        raise PromptFileError(f"{where} has no rows: give at least one prompt")
    col = text_column if picked else _pick_text_column(df, text_column, where)
    texts = []
    for i, value in enumerate(df[col].tolist(), start=start):
        if not isinstance(value, str):
            if _is_missing(value):
                raise PromptFileError(f"{where} {row_label(i)} has no text in column {col!r}: fill it in or remove the row")
            raise PromptFileError(
                f"{where} {row_label(i)} has a value of type {type(value).__name__} ({_short(value)}) in text column {col!r}: "
                f"prompts must be strings; quote it or pick another column with --text-column"
            )
        text = value.rstrip("\r\n")
        if not text.strip():
            raise PromptFileError(f"{where} {row_label(i)} has an empty text in column {col!r}: fill it in or remove the row")
        texts.append(text)

    rename: dict[Any, str] = {}
    already_loaded = "sample_id" in df.columns and df["sample_id"].tolist() == list(range(start, start + len(df)))
    if already_loaded:  # a frame from load_prompts itself: its ids are ours, keep them as they are
        df = df.drop(columns=["sample_id"])
    elif "sample_id" in df.columns:
        rename["sample_id"] = "source_sample_id"
    if col != "text" and "text" in df.columns:
        rename["text"] = "source_text"
    others = df.drop(columns=[col]).rename(columns=rename).reset_index(drop=True)
    return pd.concat([_frame({"text": texts}, start), others], axis=1)


def _frame(columns: dict[str, list[Any]], start: int = 0) -> pd.DataFrame:
    n = len(columns["text"])
    out = pd.DataFrame({"sample_id": pd.Series(range(start, start + n), dtype="int64")})
    out["text"] = pd.Series(columns["text"], dtype=object).astype(str)
    return out


def _plain_row(i: int) -> str:
    return f"row {i}"


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return isinstance(value, float) and math.isnan(value)
    except TypeError:
        return False


def _original_name(df: pd.DataFrame, name: str) -> Any:
    for c in df.columns:
        if str(c) == name:
            return c
    raise KeyError(name)


def _canonical(value: Any) -> Any:
    if type(value) is str:  # most values: texts and string labels
        return value
    if _is_missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy scalar -> Python
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer() and abs(value) < 2**53:
            # CSV readers turn int columns with gaps into floats; 3 and 3.0 hash the same.
            return int(value)
        return value
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, str)):
        seq = value.tolist() if hasattr(value, "tolist") else value
        return [_canonical(v) for v in seq]
    return str(value)
