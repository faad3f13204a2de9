"""RunWriter: creates or resumes a run and commits shards atomically.

Commit protocol for one shard (what makes a crash or a full disk harmless):
1. write `part-NNNNN.<ext>.tmp-<pid>-<rand>` in the layer's folder, flush + fsync, hash it;
2. rename it to `part-NNNNN.<ext>` (atomic on one filesystem), fsync the folder;
3. rewrite `manifest.json` atomically with the new ShardRecord.
The manifest therefore never lists a shard that is not whole on disk. `write_shards` commits one
shard index of many layers at once: the files are written, fsynced and hashed on a small thread
pool (pwrite, fsync and sha256 release the GIL, so the layers proceed in parallel), then renamed
together under one lock with one manifest rewrite: per shard that saves 2 fsyncs per layer, which
is most of what a commit costs next to a raw write. Any OSError on the way removes
the temp file and raises a one-line StorageError; re-running the same command resumes.

Manifest updates are read-modify-write under an advisory lock (`<run>/.lock`), so several
processes (Ray workers, via `RunWriter.attach`) may commit shards of the same run on a local or
POSIX shared filesystem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from ..errors import ConfigError, RunExistsError, RunFormatError, StorageError
from .manifest import (
    ACTIVATIONS_DIR, FORMATS, MANIFEST_NAME, PROMPTS_NAME, TMP_MARKER, Manifest, ShardRecord, _first_error,
    coverage_problems, fsync_dir, load_manifest, neuronmap_version, now_iso, shard_relpath, storage_error,
    write_manifest,
)
from .liveness import hold_writing, release_writing
from .shards import check_compression, write_shard_file
from .validate import as_index, check_shard

try:
    import fcntl
except ImportError:  # Windows: single-process writing only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Threads that write, fsync and hash the layers of one shard at once (I/O bound: more buys nothing).
SHARD_THREADS = 8
# Fields that must be equal for an unfinished run to be resumed rather than refused.
RESUME_KEYS = ("model", "config_hash", "tokenizer", "layers", "pooling", "dtype", "format", "compression",
               "prompt_source_hash", "max_length", "n_samples")
# Fields `update`/`complete` may not change (the writer owns them).
OWNED_KEYS = ("status", "error", "shards", "schema_version", "created", "updated", "layers", "format")


class RunWriter:
    """Write a run at `path`: create it, or resume an unfinished one with the same configuration.

    Parameters
    ----------
    path : path
        Run folder. Created if missing.
    manifest : Manifest or dict
        Run description (`Manifest.new(...)`); status, shards and timestamps are set by the writer.
    format : {"hdf5", "parquet"}, optional
        Overrides `manifest.format`.
    compression : str, optional
        hdf5: gzip | lzf; parquet: snappy | gzip | zstd | lz4 | brotli. Overrides `manifest.compression`.
    overwrite : bool
        Replace whatever run is at `path` (it is deleted first). Without it a complete run raises
        RunExistsError and an unfinished run of another configuration raises ConfigError.

    Attributes
    ----------
    resumed : bool
        True when an unfinished run was reopened; its committed shards were kept.
    """

    def __init__(self, path: str | os.PathLike, manifest: Manifest | dict, format: str | None = None,
                 compression: str | None = None, overwrite: bool = False):
        from .remote import is_remote

        if is_remote(path):  # Path("s3://b/p") would quietly become a local folder named "s3:"
            raise ConfigError(f"{path} is object storage; RunWriter writes local folders: use "
                              "neuronmap.extract(..., out='s3://...') or --out s3://... (Parquet runs)")
        self.path = Path(path)
        if isinstance(manifest, dict):
            manifest = Manifest.new(**manifest)
        fmt = format or manifest.format
        if fmt not in FORMATS:
            raise ConfigError(f"format={fmt!r} is not supported; use one of {', '.join(FORMATS)}")
        compression = check_compression(fmt, compression if compression is not None else manifest.compression)
        stamp = now_iso()
        fresh = manifest.model_copy(deep=True, update=dict(
            format=fmt, compression=compression, status="running", error=None, shards=[], created=stamp,
            updated=stamp, neuronmap_version=neuronmap_version()))
        self.resumed = False
        self._stat: tuple | None = None
        old = self._existing(overwrite)
        if old is not None:
            fresh = self._resume(old, fresh)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / ACTIVATIONS_DIR).mkdir(exist_ok=True)
        except OSError as error:
            raise storage_error(error, self.path) from None
        self._writing = hold_writing(self.path)  # before the run says `running`: a reader never sees it orphaned
        with self._lock():
            self._save(fresh)
        if self.resumed:
            self._remove_temp_files()

    @classmethod
    def attach(cls, path: str | os.PathLike) -> "RunWriter":
        """Writer for an existing *running* run, for extra processes committing shards (no cleanup)."""
        manifest = load_manifest(path)
        if manifest.status != "running":
            raise RunFormatError(f"run {path} is {manifest.status}; only a running run accepts shards")
        self = cls.__new__(cls)
        self.path, self.resumed, self._stat, self._manifest = Path(path), True, None, manifest
        self._writing = hold_writing(self.path)
        self._remember_stat()
        return self

    # -- public API ------------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        """The manifest as this writer last wrote or read it (do not mutate)."""
        return self._manifest

    def write_prompts(self, df: pd.DataFrame) -> None:
        """Store the prompts (`sample_id` int64 added as 0..n-1 when missing, `text`, labels) atomically."""
        if not isinstance(df, pd.DataFrame):
            raise ConfigError(f"prompts must be a pandas DataFrame, got {type(df).__name__}")
        if "text" not in df.columns:
            raise ConfigError(f"prompts need a 'text' column; got columns {list(map(str, df.columns))}")
        if len(df) != self._manifest.n_samples:
            raise ConfigError(f"prompts have {len(df)} rows but the run has n_samples={self._manifest.n_samples}")
        df = df.reset_index(drop=True)
        if "sample_id" not in df.columns:
            df.insert(0, "sample_id", np.arange(len(df), dtype=np.int64))
        try:
            df["sample_id"] = df["sample_id"].astype(np.int64)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"prompt column 'sample_id' must be integers: {error}") from None
        if not df["sample_id"].is_unique:
            raise ConfigError("prompt column 'sample_id' has duplicates; every prompt needs its own id")
        try:
            table = pa.Table.from_pandas(df, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ConfigError(f"prompts cannot be stored as Parquet: {' '.join(str(error).split())}") from None
        final = self.path / PROMPTS_NAME
        tmp = self._tmp_name(final)
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError as error:
            _remove(tmp)
            raise storage_error(error, final) from None
        except BaseException:
            _remove(tmp)
            raise
        fsync_dir(self.path)

    def adopt_prompts(self, staged: str | os.PathLike) -> None:
        """Make the Parquet file `staged` (e.g. `neuronmap.prompt_table.stage_prompts`) the run's prompt
        table: checked (a `text` column, `sample_id` 0..n-1, n_samples rows), then renamed into place,
        so a table of any size is stored without being loaded."""
        staged = Path(staged)
        try:
            handle = pq.ParquetFile(staged)
        except (pa.ArrowException, OSError) as error:
            raise ConfigError(f"staged prompt table {staged} is not readable Parquet: {error}") from None
        names = handle.schema_arrow.names
        if "text" not in names or "sample_id" not in names:
            raise ConfigError(f"staged prompt table {staged} needs 'sample_id' and 'text' columns; got {names}")
        if handle.metadata.num_rows != self._manifest.n_samples:
            raise ConfigError(f"staged prompt table {staged} has {handle.metadata.num_rows} rows but the run has "
                              f"n_samples={self._manifest.n_samples}")
        expected = 0
        for batch in handle.iter_batches(columns=["sample_id"], batch_size=65536):
            ids = batch.column(0).to_numpy(zero_copy_only=False)
            if not np.array_equal(ids, np.arange(expected, expected + len(ids))):
                raise ConfigError(f"staged prompt table {staged} must number its rows 0..n-1 in 'sample_id'")
            expected += len(ids)
        final = self.path / PROMPTS_NAME
        try:
            try:
                os.replace(staged, final)
            except OSError as error:
                if error.errno != 18:  # EXDEV: another filesystem, copy instead of renaming
                    raise
                tmp = self._tmp_name(final)
                shutil.copyfile(staged, tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
        except OSError as error:
            raise storage_error(error, final) from None
        fsync_dir(self.path)

    def write_shard(self, layer: str, shard_index: int, rows: tuple[int, int], samples: tuple[int, int],
                    activations: np.ndarray, sample_ids: np.ndarray,
                    token_index: np.ndarray | None = None) -> ShardRecord:
        """Commit rows `[rows[0], rows[1])` of `layer` as shard `shard_index` (atomic; see module doc).

        activations : ndarray of shape (rows[1] - rows[0], *layer_shape), cast to the layer's dtype
        sample_ids : ndarray of shape (n_rows,), the prompt's sample_id for every row
        token_index : ndarray of shape (n_rows,), per-token layers only (position in the prompt)
        samples : the prompts `[start, end)` (positions in prompts.parquet) this shard holds
        """
        manifest = self._manifest
        args = check_shard(manifest, layer, shard_index, rows, samples, activations, sample_ids, token_index)
        final = self.path / args.relpath
        tmp = self._tmp_name(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            digest, size = write_shard_file(tmp, manifest.format, layer, args.activations, args.sample_ids,
                                            args.token_index, manifest.compression,
                                            attrs={"rows": list(args.rows), "samples": list(args.samples)})
        except OSError as error:
            _remove(tmp)
            raise storage_error(error, final) from None
        except BaseException:
            _remove(tmp)
            raise
        record = ShardRecord(path=args.relpath, layer=layer, rows=args.rows, samples=args.samples, sha256=digest,
                             bytes=size)
        self._commit(tmp, final, record)
        return record

    def write_shards(self, shard_index: int, rows: tuple[int, int], samples: tuple[int, int],
                     arrays: dict[str, np.ndarray], sample_ids: np.ndarray,
                     token_index: np.ndarray | None = None) -> list[ShardRecord]:
        """Commit shard `shard_index` of every layer in `arrays` together (all or none listed).

        Same arguments as `write_shard`, with `arrays` mapping layer -> activations; every layer's
        shard holds the same rows, samples, sample_ids and token_index. All arguments are checked
        before anything is written; the manifest is rewritten once for all layers.
        """
        manifest = self._manifest
        checked = [check_shard(manifest, layer, shard_index, rows, samples, acts, sample_ids, token_index)
                   for layer, acts in arrays.items()]
        if not checked:
            return []
        temps = {args.relpath: self._tmp_name(self.path / args.relpath) for args in checked}

        def write_one(args: Any) -> tuple[str, int]:
            tmp = temps[args.relpath]
            tmp.parent.mkdir(parents=True, exist_ok=True)
            return write_shard_file(tmp, manifest.format, args.layer, args.activations, args.sample_ids,
                                    args.token_index, manifest.compression,
                                    attrs={"rows": list(args.rows), "samples": list(args.samples)})

        futures = []
        try:
            futures = [_io_pool().submit(write_one, args) for args in checked]
            wait(futures)  # all of them, also when one failed: cleanup below must not race a writer
            done = [future.result() for future in futures]
        except OSError as error:
            for tmp in temps.values():
                _remove(tmp)
            failed = next((args for args, future in zip(checked, futures) if future.exception() is error), checked[0])
            raise storage_error(error, self.path / failed.relpath) from None
        except BaseException:
            for tmp in temps.values():
                _remove(tmp)
            raise
        records = [ShardRecord(path=args.relpath, layer=args.layer, rows=args.rows, samples=args.samples,
                               sha256=digest, bytes=size) for args, (digest, size) in zip(checked, done)]
        self._commit_many([(temps[r.path], self.path / r.path, r) for r in records])
        return records

    def committed(self, layer: str, shard_index: int) -> bool:
        """True when shard `shard_index` of `layer` is in the manifest and its file is there, whole."""
        self._manifest.layer(layer)
        relpath = shard_relpath(layer, as_index(shard_index), self._manifest.format)
        for shard in self._manifest.shards:
            if shard.path == relpath:
                try:
                    return (self.path / relpath).stat().st_size == shard.bytes
                except OSError:
                    return False
        return False

    def update(self, **fields: Any) -> Manifest:
        """Change descriptive manifest fields (e.g. n_tokens, n_truncated, extra) and save atomically."""
        with self._lock():
            manifest = self._apply(self._reload(), fields)
            self._save(manifest)
        return manifest

    def complete(self, **fields: Any) -> Manifest:
        """Check every layer covers its rows exactly once with whole files, then mark the run complete.

        `fields` are applied first like `update`. Gaps, overlaps or missing files raise RunFormatError
        and leave the run running (resumable).
        """
        with self._lock():
            manifest = self._apply(self._reload(), fields)
            problems = coverage_problems(manifest)
            for shard in manifest.shards:
                try:
                    size = (self.path / shard.path).stat().st_size
                except OSError:
                    size = None
                if size != shard.bytes:
                    problems.append(f"shard {shard.path} is missing or has the wrong size")
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise RunFormatError(f"cannot complete run {self.path}: {problems[0]}{more}")
            # Shards in one order whoever committed them (workers finish out of order): by sample range,
            # then layer, as a sequential extraction lists them, so equal runs have equal manifests.
            position = {name: i for i, name in enumerate(manifest.layers)}
            manifest.shards = sorted(manifest.shards, key=lambda s: (s.samples[0], position.get(s.layer, len(position)),
                                                                     s.layer, s.path))
            manifest.status, manifest.error = "complete", None
            self._save(manifest)
        self.close()
        return manifest

    def fail(self, message: str) -> None:
        """Mark the run failed with a one-line `message`; committed shards stay and can be resumed."""
        with self._lock():
            manifest = self._reload()
            manifest.status, manifest.error = "failed", " ".join(str(message).split()) or "failed"
            self._save(manifest)
        self.close()

    def close(self) -> None:
        """Stop holding the run's writing lock (`liveness`): this process no longer writes it. Idempotent;
        also what happens when the process dies."""
        release_writing(getattr(self, "_writing", None))
        self._writing = None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and self._manifest.status == "running":
            with contextlib.suppress(Exception):
                self.fail(f"{exc_type.__name__}: {exc}")
        self.close()
        return False

    # -- creating / resuming ---------------------------------------------------------------------
    def _existing(self, overwrite: bool) -> Manifest | None:
        """Deal with what is at `path`; return the old manifest when it is to be resumed."""
        path = self.path
        if not path.exists():
            return None
        if not path.is_dir():
            raise ConfigError(f"output {path} exists and is not a folder; choose another output folder")
        is_run = (path / MANIFEST_NAME).exists()
        if not is_run:
            if any(path.iterdir()):
                raise RunExistsError(f"{path} is not empty and is not a NeuronMap run (no {MANIFEST_NAME}); "
                                     "choose another output folder, it will not be deleted")
            return None
        if overwrite:
            _delete_run(path)
            return None
        try:
            old = load_manifest(path)
        except RunFormatError as error:
            hint = "" if "--overwrite" in str(error) else "; pass --overwrite to replace it"
            raise RunFormatError(f"{error}{hint}") from None
        if old.status == "complete":
            raise RunExistsError(f"a complete run already exists at {path}; pass --overwrite to replace it "
                                 "or choose another output folder")
        return old

    def _resume(self, old: Manifest, new: Manifest) -> Manifest:
        differ = [k for k in RESUME_KEYS if getattr(old, k) != getattr(new, k)]
        if old.n_tokens is not None and new.n_tokens is not None and old.n_tokens != new.n_tokens:
            differ.append("n_tokens")
        if differ:
            raise ConfigError(f"{self.path} holds an unfinished ({old.status}) run of a different configuration "
                              f"(differs in: {', '.join(differ)}); pass --overwrite to replace it or choose another output folder")
        from .verify import shard_problem

        # Every kept shard is rechecked against its sha256 (a few threads; cheaper than computing it
        # again): a damaged one is dropped and extracted again, never carried into a `complete` run.
        kept = []
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(lambda shard: shard_problem(self.path, shard), old.shards))
        for shard, problem in zip(old.shards, problems):
            if problem is None:
                kept.append(shard)
            else:
                log.warning("resuming %s: %s; that shard is extracted again", self.path, problem)
        self.resumed = True
        log.info("resuming run %s: %d committed shards kept", self.path, len(kept))
        return new.model_copy(update=dict(shards=kept, created=old.created))

    def _remove_temp_files(self) -> None:
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                if TMP_MARKER in name:
                    _remove(Path(root) / name)

    # -- manifest plumbing -----------------------------------------------------------------------
    def _commit(self, tmp: Path, final: Path, record: ShardRecord) -> None:
        """Rename the finished temp file into place and list it, never listing a file that is not there."""
        renamed = False
        try:
            with self._lock():
                manifest = self._reload()
                if any(s.path == record.path for s in manifest.shards):  # re-writing: unlist the old file first
                    manifest.shards = [s for s in manifest.shards if s.path != record.path]
                    self._save(manifest)
                try:
                    os.replace(tmp, final)
                except OSError as error:
                    raise storage_error(error, final) from None
                renamed = True
                fsync_dir(final.parent)
                manifest.shards.append(record)
                manifest.updated = now_iso()
                self._save(manifest)
        except BaseException:
            _remove(tmp)
            if renamed:
                _remove(final)
            raise

    def _commit_many(self, items: list[tuple[Path, Path, ShardRecord]]) -> None:
        """`_commit` for several files with one manifest rewrite; on failure none of them is listed."""
        renamed: list[Path] = []
        paths = {record.path for _, _, record in items}
        try:
            with self._lock():
                manifest = self._reload()
                if any(s.path in paths for s in manifest.shards):  # re-writing: unlist the old files first
                    manifest.shards = [s for s in manifest.shards if s.path not in paths]
                    self._save(manifest)
                for tmp, final, _ in items:
                    try:
                        os.replace(tmp, final)
                    except OSError as error:
                        raise storage_error(error, final) from None
                    renamed.append(final)
                folders = sorted({final.parent for _, final, _ in items})
                list(_io_pool().map(fsync_dir, folders))
                manifest.shards.extend(record for _, _, record in items)
                self._save(manifest)
        except BaseException:
            for tmp, _, _ in items:
                _remove(tmp)
            for final in renamed:
                _remove(final)
            raise

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise storage_error(error, self.path / LOCK_NAME) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _reload(self) -> Manifest:
        """Latest manifest on disk (skipped when nobody rewrote it since our last write). Hold the lock."""
        if self._stat is None or self._current_stat() != self._stat:
            self._manifest = load_manifest(self.path)
            self._remember_stat()
        # A copy the caller may change freely: its own shard list (records are never changed in place,
        # only added or removed), the rest shared. A deep copy cost O(shards) per commit: 0.7 s of a
        # 2.7 s run of 64 small shards x 12 layers (benchmarks/store_write.py).
        return self._manifest.model_copy(update={"shards": list(self._manifest.shards)})

    def _save(self, manifest: Manifest) -> None:
        manifest.updated = now_iso()
        write_manifest(self.path, manifest)
        self._manifest = manifest
        self._remember_stat()

    def _current_stat(self) -> tuple | None:
        try:
            st = (self.path / MANIFEST_NAME).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _remember_stat(self) -> None:
        self._stat = self._current_stat()

    def _apply(self, manifest: Manifest, fields: dict[str, Any]) -> Manifest:
        owned = sorted(set(fields) & set(OWNED_KEYS))
        if owned:
            raise ConfigError(f"the writer manages {', '.join(owned)}; they cannot be set through update/complete")
        try:
            return Manifest.model_validate({**manifest.model_dump(), **fields})
        except ValidationError as error:
            raise ConfigError(f"invalid manifest update: {_first_error(error)}") from None

    @staticmethod
    def _tmp_name(final: Path) -> Path:
        return final.with_name(f"{final.name}{TMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}")


def annotate_run(path: str | os.PathLike, **extra: Any) -> Manifest:
    """Merge `extra` into the manifest's free-form `extra` mapping, for a run in any state.

    For records that describe how a run came to be (an experiment's resolved configuration, a
    seed) and belong with it, also after it is complete. Nothing else in the manifest changes; the
    rewrite is atomic and under the run's lock. Unchanged values rewrite nothing.
    """
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"cannot store {', '.join(sorted(extra))} in the manifest: {error}; "
                          "pass JSON values (str, numbers, lists, dicts)") from None
    writer = RunWriter.__new__(RunWriter)
    writer.path, writer.resumed, writer._stat = Path(path), True, None
    writer._manifest = load_manifest(path)
    with writer._lock():
        manifest = writer._reload()
        try:
            updated = Manifest.model_validate({**manifest.model_dump(), "extra": {**manifest.extra, **extra}})
        except ValidationError as error:
            raise ConfigError(f"cannot store {', '.join(sorted(extra))} in the manifest: {_first_error(error)}") from None
        if updated.extra != manifest.extra:
            writer._save(updated)
    return writer._manifest


_IO_POOL: ThreadPoolExecutor | None = None
_IO_POOL_LOCK = threading.Lock()


def _forget_io_pool() -> None:
    global _IO_POOL, _IO_POOL_LOCK
    _IO_POOL, _IO_POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: start its own pool
    os.register_at_fork(after_in_child=_forget_io_pool)


def _io_pool() -> ThreadPoolExecutor:
    """The process's shard I/O threads, started once: starting 8 threads per shard cost ~6 ms of a
    shard's ~27 ms fixed cost on 2 CPUs. Its tasks never wait on the pool themselves (no deadlock)."""
    global _IO_POOL
    with _IO_POOL_LOCK:
        if _IO_POOL is None:
            _IO_POOL = ThreadPoolExecutor(max_workers=SHARD_THREADS, thread_name_prefix="neuronmap-shard")
        return _IO_POOL


def _delete_run(path: Path) -> None:
    """Delete the run at `path` for --overwrite, manifest first: a deletion that stops half way leaves a
    folder that no longer claims to be a run, never a `complete` manifest over missing shards."""
    try:
        (path / MANIFEST_NAME).unlink()
        fsync_dir(path)
    except OSError as error:
        raise StorageError(f"cannot delete the old run at {path} for --overwrite: {error.strerror or error}; "
                           "fix the folder's permissions or choose another output folder (nothing was deleted)") from None
    try:
        shutil.rmtree(path)
    except OSError as error:
        raise StorageError(f"cannot delete the rest of the old run at {path} for --overwrite: "
                           f"{error.strerror or error}; its manifest is gone, so delete the folder by hand "
                           "(fix its permissions) or choose another output folder") from None


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
