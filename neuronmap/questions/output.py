"""Writing a generated prompt table to a file that ``neuronmap extract --prompts`` reads back.

``save_prompts(df, path)`` writes ``.csv``, ``.jsonl`` or ``.parquet`` by extension, atomically (a
temporary file in the same folder, then a rename), and never replaces an existing file unless
``overwrite=True``. The file loads with ``neuronmap.prompts.load_prompts`` into the same texts and labels.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

import pandas as pd

from neuronmap.errors import ConfigError

__all__ = ["OUTPUT_EXTENSIONS", "check_output", "save_prompts"]

OUTPUT_EXTENSIONS = (".csv", ".jsonl", ".parquet")


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``path`` if a prompt table can be written there, else a one-line error (run before generating)."""
    from neuronmap.store.manifest import storage_error

    path = Path(path).expanduser()
    ext = path.suffix.lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise ConfigError(f"output file {path} has extension {ext or '(none)'!r}: use one of "
                          f"{', '.join(OUTPUT_EXTENSIONS)} (e.g. --out prompts.csv)")
    if path.is_dir():
        raise ConfigError(f"output {path} is a directory: pass a file name such as {path / ('prompts' + ext)}")
    if path.exists() and not overwrite:
        raise ConfigError(f"output file {path} already exists: pass --overwrite to replace it, or choose another --out")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise storage_error(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)), path,
                            resumable=False)
    return path


def save_prompts(df: pd.DataFrame, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``df`` (a ``text`` column plus labels) to ``path``; returns the path."""
    from neuronmap.store.manifest import storage_error

    if "text" not in df.columns:
        raise ConfigError("the prompt table has no 'text' column: generate it with neuronmap.questions")
    path = check_output(path, overwrite)
    ext = path.suffix.lower()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a plain new file (not mkstemp's 0600) so the result gets the usual permissions
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if ext == ".csv":
                df.to_csv(tmp, index=False, encoding="utf-8")
            elif ext == ".jsonl":
                df.to_json(tmp, orient="records", lines=True, force_ascii=False)
            else:
                df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise storage_error(error, path, resumable=False) from None
    return path
