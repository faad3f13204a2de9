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

`DEFAULT_PROMPTS` is the shipped prompt set (``neuronmap/data/questions.csv``): about 430
hand-written English questions and statements with the label columns ``topic``, ``question_type``,
``sentiment``, ``answer_type``, ``length_bucket`` (words: short <= 7, medium 8-15, long >= 16) and
``is_question``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import pandas as pd

from neuronmap.errors import ConfigError, PromptFileError

__all__ = [
    "DEFAULT_PROMPTS",
    "SUPPORTED_EXTENSIONS",
    "TEXT_COLUMN_CANDIDATES",
    "load_prompts",
    "prompt_source_hash",
]

DEFAULT_PROMPTS: Path = Path(__file__).resolve().parent / "data" / "questions.csv"

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
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit={limit!r} is invalid: pass a positive integer, or None for all prompts")

    if isinstance(source, pd.DataFrame):
        df = source.reset_index(drop=True)
        if limit is not None:
            df = df.iloc[:limit]
        return _finish(df.copy(), text_column, where="the DataFrame", row_label=_plain_row)

    if isinstance(source, (list, tuple)):
        return _from_list(source, limit)

    if not isinstance(source, (str, os.PathLike)):
        raise PromptFileError(
            f"cannot read prompts from a {type(source).__name__}: pass a file path "
            f"({', '.join(SUPPORTED_EXTENSIONS)}), a list of strings or a pandas DataFrame"
        )

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

    if ext == ".txt":
        return _from_txt(path, limit)
    if ext == ".jsonl":
        return _from_jsonl(path, text_column, limit)
    if ext == ".csv":
        return _from_csv(path, text_column, limit)
    return _from_parquet(path, text_column, limit)


def prompt_source_hash(df: pd.DataFrame) -> str:
    """sha256 (hex) of a prompt table's texts and label columns, in row order.

    ``sample_id`` is left out (it is derived from the row order, which is hashed anyway); the
    other columns are hashed in sorted-name order, so reordering columns does not change the hash,
    while any change of a text, a label value or the row order does. Values are serialised
    canonically (missing -> null, numpy scalars -> Python, floats by repr), so the hash is the same
    across processes, machines and the CSV/Parquet/JSONL form of the same table.
    """
    if "text" not in df.columns:
        raise PromptFileError("prompt table has no 'text' column: load it with neuronmap.prompts.load_prompts")
    h = hashlib.sha256()
    h.update(b"neuronmap-prompts-v1\n")
    h.update(f"{len(df)}\n".encode())
    others = sorted(str(c) for c in df.columns if c not in ("sample_id", "text"))
    for col in ["text", *others]:
        h.update(b"\x00col\x00" + json.dumps(col, ensure_ascii=False).encode("utf-8") + b"\n")
        series = df["text"] if col == "text" else df[_original_name(df, col)]
        for value in series.tolist():
            h.update(json.dumps(_canonical(value), ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# sources


def _from_list(items: Sequence[Any], limit: int | None) -> pd.DataFrame:
    if limit is not None:
        items = items[:limit]
    if len(items) == 0:
        raise PromptFileError("the prompt list is empty: pass at least one non-blank string")
    texts = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise PromptFileError(
                f"the prompt list has a value of type {type(item).__name__} at index {i} ({_short(item)}): every prompt must be a string"
            )
        text = item.rstrip("\r\n")
        if not text.strip():
            raise PromptFileError(f"the prompt list has an empty prompt at index {i}: remove it or give it text")
        texts.append(text)
    return _frame({"text": texts})


def _from_txt(path: Path, limit: int | None) -> pd.DataFrame:
    texts: list[str] = []
    for _lineno, line in _iter_utf8_lines(path):
        if not line.strip():
            continue
        texts.append(line)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise PromptFileError(f"prompt file {path} is empty (no non-blank lines): write one prompt per line")
    return _frame({"text": texts})


def _from_jsonl(path: Path, text_column: str | None, limit: int | None) -> pd.DataFrame:
    # Column-wise accumulation: one list per key, no list of per-row dicts.
    columns: dict[str, list[Any]] = {}
    linenos: list[int] = []
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
        for key, value in obj.items():
            col = columns.get(key)
            if col is None:
                col = columns[key] = [None] * n
            col.append(value)
        n += 1
        for col in columns.values():
            if len(col) < n:
                col.append(None)
        linenos.append(lineno)
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise PromptFileError(f"prompt file {path} is empty (no JSON objects): write one JSON object per line")
    df = pd.DataFrame(columns, index=pd.RangeIndex(n))
    return _finish(df, text_column, where=f"prompt file {path}", row_label=lambda i: f"line {linenos[i]}")


def _from_csv(path: Path, text_column: str | None, limit: int | None) -> pd.DataFrame:
    where = f"prompt file {path}"
    kwargs: dict[str, Any] = {"encoding": "utf-8", "nrows": limit}
    try:
        df = pd.read_csv(path, **kwargs)
    except UnicodeDecodeError:
        _raise_not_utf8(path)
    except pd.errors.EmptyDataError:
        raise PromptFileError(f"{where} is empty: write a header row (e.g. `text`) and one prompt per row") from None
    except pd.errors.ParserError as e:
        msg = " ".join(str(e).split())
        raise PromptFileError(f"{where} is not valid CSV ({msg}): fix that row, quoting fields that contain commas") from None
    col = _pick_text_column(df, text_column, where)
    if not all(isinstance(v, str) for v in df[col].tolist()):
        # CSV cells are untyped: the NA/number inference that suits labels would turn prompts such
        # as "NA" into NaN and "42" into an int. Re-read just the text column verbatim.
        raw = pd.read_csv(path, encoding="utf-8", nrows=limit, usecols=[col], dtype=str,
                          keep_default_na=False)
        df[col] = raw[col].to_numpy(dtype=object)
    # header is line 1; multi-line quoted fields make this approximate, so say "row" first
    return _finish(df, col, where=where, row_label=lambda i: f"row {i} (line {i + 2})", picked=True)


def _from_parquet(path: Path, text_column: str | None, limit: int | None) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"prompt file {path}"
    try:
        pf = pq.ParquetFile(path)
        if limit is None:
            table = pf.read()
        else:
            batches = []
            got = 0
            for batch in pf.iter_batches(batch_size=min(limit, 65536)):
                batches.append(batch)
                got += batch.num_rows
                if got >= limit:
                    break
            table = pa.Table.from_batches(batches, schema=pf.schema_arrow).slice(0, limit)
    except (pa.ArrowException, OSError) as e:
        msg = " ".join(str(e).split())
        raise PromptFileError(f"{where} is not a readable Parquet file ({msg}): re-export it, e.g. with pandas.DataFrame.to_parquet") from None
    if table.num_rows == 0:
        raise PromptFileError(f"{where} is empty (0 rows): write at least one prompt row")
    df = table.to_pandas()
    # A named index saved by pandas is data (e.g. an id column): keep it; an unnamed one is not.
    df = df.reset_index(drop=all(name is None for name in df.index.names))
    return _finish(df, text_column, where=where, row_label=_plain_row)


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
    for cand in TEXT_COLUMN_CANDIDATES:
        if cand in df.columns:
            return cand
    for cand in TEXT_COLUMN_CANDIDATES:
        for c in cols:
            if c.lower() == cand:
                return c
    raise PromptFileError(
        f"{where} has no text column (looked for {', '.join(TEXT_COLUMN_CANDIDATES)}); "
        f"columns present: {present}: pass the one holding the prompts with --text-column"
    )


def _finish(df: pd.DataFrame, text_column: str | None, *, where: str, row_label, picked: bool = False) -> pd.DataFrame:
    if len(df) == 0:
        raise PromptFileError(f"{where} has no rows: give at least one prompt")
    col = text_column if picked else _pick_text_column(df, text_column, where)
    texts = []
    for i, value in enumerate(df[col].tolist()):
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
    already_loaded = "sample_id" in df.columns and df["sample_id"].tolist() == list(range(len(df)))
    if already_loaded:  # a frame from load_prompts itself: its ids are ours, keep them as they are
        df = df.drop(columns=["sample_id"])
    elif "sample_id" in df.columns:
        rename["sample_id"] = "source_sample_id"
    if col != "text" and "text" in df.columns:
        rename["text"] = "source_text"
    others = df.drop(columns=[col]).rename(columns=rename).reset_index(drop=True)
    return pd.concat([_frame({"text": texts}), others], axis=1)


def _frame(columns: dict[str, list[Any]]) -> pd.DataFrame:
    n = len(columns["text"])
    out = pd.DataFrame({"sample_id": pd.Series(range(n), dtype="int64")})
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
