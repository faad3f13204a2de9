"""Runs on object storage: `extract(..., out="s3://bucket/prefix", format="parquet")` and
`open_remote_run("s3://bucket/prefix")`, through `pyarrow.fs.S3FileSystem`.

Writing. Object stores have no rename and no append, so shards are not written into the bucket in
place. The run is written by the ordinary `RunWriter` into a local staging folder, and `RunMirror`
copies it up: every shard the staged manifest lists (one PUT per object: an object is visible whole
or not at all), then `manifest.json`, last. The bucket's manifest therefore only ever lists shards
that are whole in the bucket (each upload is checked against the shard's sha256 while it streams);
a shard that must be replaced is first unlisted. The mirror runs on a background thread every
`SYNC_INTERVAL_S` seconds while the extraction runs and once more at the end, so a crash loses at
most the shards of the last few seconds.

Resuming. The bucket is the truth: an unfinished run in the bucket is resumed from the staging
folder when that folder holds the same run (same `created` stamp), else its committed shards are
downloaded into a fresh staging folder first (each checked against its sha256), and `RunWriter`
resumes from there. A complete run in the bucket is never touched without `overwrite`; a prefix
holding objects but no manifest is never deleted.

Reading. `RemoteRun` is a `Run` whose files are fetched on first use into a local cache (the
manifest at open, prompts and each shard when a read needs it, checked against their sha256), so
`array`, `iter_batches` and every analysis read the bucket through the ordinary reader.

HDF5 runs stay local (an HDF5 file is not an object-store format: readers seek into it); asking for
one on s3:// is a one-line ConfigError. Configuration: credentials from the AWS chain (AWS_ACCESS_KEY_ID
/ AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, ~/.aws, instance roles), region from AWS_REGION or
AWS_DEFAULT_REGION, endpoint from NEURONMAP_S3_ENDPOINT, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL
(MinIO, Ceph, moto: `http://127.0.0.1:9000`). Staging and cache folders: NEURONMAP_STAGING_DIR and
NEURONMAP_CACHE_DIR (default under ~/.cache/neuronmap).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from ..errors import ConfigError, RunExistsError, RunFormatError, StorageError
from .manifest import MANIFEST_NAME, PROMPTS_NAME, TMP_MARKER, Manifest, ShardRecord, load_manifest
from .reader import Run

log = logging.getLogger(__name__)

SCHEME = "s3://"
ENDPOINT_VARS = ("NEURONMAP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
SYNC_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 5.0
RETRY_ATTEMPTS = 3
CHUNK_BYTES = 8 << 20


def is_remote(path: Any) -> bool:
    """True for an `s3://` URL. Also for one that went through `pathlib.Path`, which folds `//` into `/`."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    return isinstance(path, str) and (path.startswith(SCHEME) or path.startswith("s3:/") or path == "s3:")


@dataclass(frozen=True)
class Location:
    """`s3://bucket/prefix` split up; `key(relpath)` is the object path pyarrow.fs takes (no scheme)."""

    url: str
    bucket: str
    prefix: str

    @property
    def base(self) -> str:
        return f"{self.bucket}/{self.prefix}"

    def key(self, relpath: str) -> str:
        return f"{self.base}/{relpath}"


def parse_url(url: Any) -> Location:
    """Parse `s3://BUCKET/PREFIX` (the prefix is the run's folder); ConfigError naming the form."""
    text = os.fspath(url) if isinstance(url, os.PathLike) else str(url)
    if text.startswith("s3:/") and not text.startswith(SCHEME):
        text = SCHEME + text[len("s3:/"):]
    bucket, _, prefix = text[len(SCHEME):].partition("/") if text.startswith(SCHEME) else ("", "", "")
    prefix = prefix.strip("/")
    if not bucket or not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(f"{text!r} is not a run location on object storage; use s3://BUCKET/PREFIX "
                          "(a run is a folder: the prefix cannot be empty)")
    return Location(f"{SCHEME}{bucket}/{prefix}", bucket, prefix)


def endpoint() -> str | None:
    """The S3 endpoint URL from the environment (first of ENDPOINT_VARS that is set), or None for AWS."""
    for name in ENDPOINT_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def filesystem() -> Any:
    """A `pyarrow.fs.S3FileSystem` for the environment's endpoint, region and credentials."""
    from pyarrow import fs as pafs

    kwargs: dict[str, Any] = dict(connect_timeout=CONNECT_TIMEOUT_S,
                                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS))
    url = endpoint()
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        if not parsed.netloc:
            raise ConfigError(f"S3 endpoint {url!r} is not a URL; set NEURONMAP_S3_ENDPOINT to e.g. http://HOST:9000")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


READS = ("reading", "listing")  # what `_storage` does without writing: nothing to resume after these


def _storage_error(error: OSError, location: Location, doing: str) -> StorageError:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    where = f" at {endpoint()}" if endpoint() else ""
    return StorageError(f"object storage{where} failed while {doing} {location.url}: {reason}; check the bucket, "
                        "the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the endpoint "
                        f"(NEURONMAP_S3_ENDPOINT), then re-run the same command{'' if doing in READS else ' to resume'}")


@contextlib.contextmanager
def _storage(location: Location, doing: str) -> Iterator[None]:
    """OSErrors of pyarrow.fs (network, credentials, missing bucket) -> one-line StorageError."""
    try:
        yield
    except OSError as error:
        raise _storage_error(error, location, doing) from None


def _cache_key(location: Location) -> str:
    return hashlib.sha256(f"{endpoint() or 'aws'}|{location.url}".encode()).hexdigest()[:20]


def staging_dir(location: Location) -> Path:
    """Local folder where the run at `location` is written before it is copied up (one per URL)."""
    root = os.environ.get("NEURONMAP_STAGING_DIR") or Path.home() / ".cache" / "neuronmap" / "staging"
    return Path(root) / _cache_key(location)


def cache_dir(location: Location) -> Path:
    """Local folder holding the files of the remote run read so far (one per URL)."""
    root = os.environ.get("NEURONMAP_CACHE_DIR") or Path.home() / ".cache" / "neuronmap" / "remote"
    return Path(root) / _cache_key(location)


# ----------------------------------------------------------------------------------------- objects
def _read_manifest(fs: Any, location: Location) -> Manifest | None:
    """The bucket's manifest, None when there is none; a corrupt one is a RunFormatError."""
    import json

    from pydantic import ValidationError

    from pyarrow import fs as pafs

    key = location.key(MANIFEST_NAME)
    with _storage(location, "reading"):
        if fs.get_file_info(key).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(key) as stream:
            text = stream.read().decode("utf-8")
    try:
        return Manifest.model_validate(json.loads(text))
    except (ValueError, ValidationError) as error:
        reason = " ".join(str(error).split())[:200]
        raise RunFormatError(f"{location.url}/{MANIFEST_NAME} is not a valid run manifest ({reason}); "
                             "pass --overwrite to replace the run") from None


def _has_objects(fs: Any, location: Location) -> bool:
    from pyarrow import fs as pafs

    with _storage(location, "listing"):
        selector = pafs.FileSelector(location.base, recursive=True, allow_not_found=True)
        return any(info.type == pafs.FileType.File for info in fs.get_file_info(selector))


def _upload(fs: Any, source: Path, key: str) -> str:
    """Stream `source` into the object `key` (one atomic PUT / multipart upload); return its sha256."""
    digest = hashlib.sha256()
    with open(source, "rb") as local, fs.open_output_stream(key, metadata={}) as remote:
        while chunk := local.read(CHUNK_BYTES):
            digest.update(chunk)
            remote.write(chunk)
    return digest.hexdigest()


def _download(fs: Any, key: str, target: Path) -> str:
    """Copy the object `key` to `target` (temp name, then rename); return its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}{TMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}")
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(key) as remote, open(tmp, "wb") as local:
            while chunk := remote.read(CHUNK_BYTES):
                digest.update(chunk)
                local.write(chunk)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ writing
class RunMirror:
    """Copies a local (staging) run to `location`, shards first and the manifest last.

    `sync()` is idempotent and cheap when nothing changed; it may run on a background thread while
    the run is written (it reads only what the writer has committed: the atomically replaced
    manifest and the shards it lists).
    """

    def __init__(self, local: Path, location: Location, fs: Any) -> None:
        self.local = Path(local)
        self.location = location
        self.fs = fs
        self.uploaded: dict[str, str] = {}  # relpath -> sha256 of the object in the bucket
        self.listed: Manifest | None = None  # what the bucket's manifest lists now
        self._prompts_stamp: tuple[int, int] | None = None
        self._last_put: bytes | None = None
        self._lock = threading.Lock()

    def adopt(self, manifest: Manifest) -> None:
        """The bucket already holds `manifest` and its shards (a resumed run): do not upload them again."""
        self.uploaded.update({shard.path: shard.sha256 for shard in manifest.shards})
        self.listed = manifest
        prompts = self.local / PROMPTS_NAME
        if prompts.exists():
            self._prompts_stamp = _stamp(prompts)

    def sync(self) -> Manifest | None:
        """Upload what the local run committed since the last sync; return the manifest now in the bucket."""
        with self._lock, _storage(self.location, "writing"):
            if not (self.local / MANIFEST_NAME).exists():
                return None
            manifest = load_manifest(self.local)
            prompts = self.local / PROMPTS_NAME
            if prompts.exists() and _stamp(prompts) != self._prompts_stamp:
                stamp = _stamp(prompts)
                _upload(self.fs, prompts, self.location.key(PROMPTS_NAME))
                self._prompts_stamp = stamp
            replaced = {s.path for s in manifest.shards
                        if s.path in self.uploaded and self.uploaded[s.path] != s.sha256}
            if replaced:  # a rewritten shard: unlist the old object before it is overwritten
                if self.listed is not None:
                    self._put(self.listed.model_copy(
                        update={"shards": [s for s in self.listed.shards if s.path not in replaced]}))
                for path in replaced:
                    del self.uploaded[path]
            for shard in manifest.shards:
                if self.uploaded.get(shard.path) == shard.sha256:
                    continue
                digest = _upload(self.fs, self.local / shard.path, self.location.key(shard.path))
                if digest == shard.sha256:
                    self.uploaded[shard.path] = digest
                # else: the file was rewritten while it streamed up; it stays unlisted until the next sync
            whole = [shard for shard in manifest.shards if self.uploaded.get(shard.path) == shard.sha256]
            update: dict[str, Any] = {"shards": whole}
            if len(whole) < len(manifest.shards) and manifest.status == "complete":
                update["status"] = "running"  # complete only once every shard is up
            visible = manifest.model_copy(update=update)
            self._put(visible)
            return visible

    def _put(self, manifest: Manifest) -> None:
        data = manifest.model_dump_json(indent=2).encode("utf-8")
        if data != self._last_put:
            with self.fs.open_output_stream(self.location.key(MANIFEST_NAME), metadata={}) as stream:
                stream.write(data)
            self._last_put = data
        self.listed = manifest


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class _Syncer:
    """Runs `mirror.sync()` every `interval` seconds on a daemon thread (errors kept, retried next time)."""

    def __init__(self, mirror: RunMirror, interval: float) -> None:
        self.mirror = mirror
        self.interval = interval
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="neuronmap-s3-sync", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.mirror.sync()
            except Exception as error:  # network hiccup: the next round (or the final sync) retries
                self.error = error
                log.warning("upload to %s failed, retrying: %s", self.mirror.location.url, error)

    def __enter__(self) -> "_Syncer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def prepare_staging(fs: Any, location: Location, staging: Path, overwrite: bool) -> tuple[RunMirror, bool]:
    """Make `staging` the local copy to write (or resume) the run at `location` into.

    Returns the mirror (knowing what the bucket holds) and whether extraction is still needed
    (False when the staged run is complete and only its upload was missing).
    """
    remote = _read_manifest(fs, location)
    if remote is None and _has_objects(fs, location):
        raise RunExistsError(f"{location.url} holds objects but no {MANIFEST_NAME}: it is not a NeuronMap run; "
                             "choose another prefix (nothing there is deleted)")
    if remote is not None and overwrite:
        with _storage(location, "deleting the old run at"):
            fs.delete_dir_contents(location.base, missing_dir_ok=True)
        remote = None
    if remote is not None and remote.status == "complete":
        raise RunExistsError(f"a complete run already exists at {location.url}; pass --overwrite to replace it "
                             "or choose another prefix")
    staged = None
    if (staging / MANIFEST_NAME).exists():
        with contextlib.suppress(RunFormatError):
            staged = load_manifest(staging)
    if overwrite or remote is None or staged is None or staged.created != remote.created:
        shutil.rmtree(staging, ignore_errors=True)  # not the bucket's run: start from what the bucket holds
        staged = None
    mirror = RunMirror(staging, location, fs)
    if remote is not None and staged is None:
        remote = _download_run(fs, location, remote, staging)
    if remote is not None:
        mirror.adopt(remote)
    return mirror, not (staged is not None and staged.status == "complete")


def _download_run(fs: Any, location: Location, manifest: Manifest, staging: Path) -> Manifest:
    """Copy an unfinished run from the bucket into `staging` so RunWriter can resume it.

    A shard whose bytes do not match its record is left out (RunWriter drops missing shards and the
    extraction redoes them). Returns the manifest of what was copied.
    """
    from .manifest import write_manifest

    staging.mkdir(parents=True, exist_ok=True)
    kept: list[ShardRecord] = []
    with _storage(location, "downloading the unfinished run from"):
        with contextlib.suppress(FileNotFoundError):
            _download(fs, location.key(PROMPTS_NAME), staging / PROMPTS_NAME)
        for shard in manifest.shards:
            try:
                digest = _download(fs, location.key(shard.path), staging / shard.path)
            except FileNotFoundError:
                digest = None
            if digest == shard.sha256:
                kept.append(shard)
            else:
                log.warning("shard %s of %s is missing or damaged in the bucket; it will be extracted again",
                            shard.path, location.url)
                with contextlib.suppress(OSError):
                    os.unlink(staging / shard.path)
    copied = manifest.model_copy(update={"shards": kept})
    write_manifest(staging, copied)
    return copied


def extract_to_remote(run_extract: Callable[..., Any], out: Any, *, format: str = "hdf5", overwrite: bool = False,
                      sync_interval: float = SYNC_INTERVAL_S, **options: Any) -> "RemoteRun":
    """Write the run of `run_extract(out=<staging>, format=..., **options)` to `out` (s3://...).

    `run_extract` is `neuronmap.extract` (any engine); it writes into the staging folder while the
    mirror copies committed shards up. Returns the run, opened from the bucket.
    """
    location = parse_url(out)
    if format != "parquet":
        raise ConfigError(f"format={format!r}: HDF5 runs are local; write to {location.url} with --format parquet, "
                          "or extract the HDF5 run to a local folder")
    fs = filesystem()
    staging = staging_dir(location)
    mirror, needed = prepare_staging(fs, location, staging, overwrite)
    if needed:
        with _Syncer(mirror, sync_interval):
            try:
                run_extract(out=str(staging), format=format, overwrite=False, **options)
            except BaseException as error:
                with contextlib.suppress(Exception):  # let the bucket show what was committed, and why it stopped
                    mirror.sync()
                if type(error) in (ConfigError, RunExistsError, RunFormatError, StorageError):
                    raise type(error)(str(error).replace(str(staging), location.url)) from None  # name the URL
                raise
    final = mirror.sync()
    if final is None or final.status != "complete":
        raise StorageError(f"the run at {location.url} is not complete in the bucket (a shard changed while it was "
                           "uploaded); re-run the same command to finish the upload")
    if not os.environ.get("NEURONMAP_KEEP_STAGING"):
        shutil.rmtree(staging, ignore_errors=True)
    return open_remote_run(location.url)


# ------------------------------------------------------------------------------------------ reading
class RemoteRun(Run):
    """A run on object storage. `path` is the local cache; `url` the run's location.

    Reads go through the ordinary `Run` methods; the files they need are fetched first (once,
    checked against the manifest's sha256).
    """

    def __init__(self, location: Location, fs: Any, cache: Path, manifest: Manifest) -> None:
        super().__init__(cache, manifest)
        self.url = location.url
        self._location = location
        self._fs = fs
        self._ready: set[str] = set()

    def __repr__(self) -> str:
        return f"RemoteRun({self.url!r}, status={self.manifest.status}, layers={len(self.layers)})"

    @functools.cached_property
    def prompts(self):  # noqa: D102 - same as Run.prompts
        self._fetch(PROMPTS_NAME, None)
        return Run.prompts.func(self)

    @functools.cached_property
    def prompt_columns(self) -> list[str]:  # noqa: D102 - same as Run.prompt_columns
        self._fetch(PROMPTS_NAME, None)
        return Run.prompt_columns.func(self)

    def check_intact(self, layers: list[str] | None = None) -> None:
        """Nothing to do up front: each file is checked against its sha256 as it is fetched."""

    def local_copy(self) -> Run:
        """Fetch every file of the run (each checked against its sha256) and return the local copy in the
        cache as an ordinary `Run`: for what reads shards as files (analyses, `runs verify`). Analyses of
        it are written beside that copy, under `NEURONMAP_CACHE_DIR`, not to the bucket."""
        from .manifest import write_manifest

        self._fetch(PROMPTS_NAME, None)
        for shard in self.manifest.shards:
            self._fetch(shard.path, shard)
        write_manifest(self.path, self.manifest)  # the bucket's manifest, beside the files it lists
        return Run(self.path, self.manifest)

    def _iter_field(self, layer: str, field: str, start: int, end: int, max_rows: int):
        for shard in self.manifest.shards_of(layer):
            if shard.rows[1] > start and shard.rows[0] < end:
                self._fetch(shard.path, shard)
        return super()._iter_field(layer, field, start, end, max_rows)

    def _fetch(self, relpath: str, record: ShardRecord | None) -> None:
        from .shards import sha256_file

        if relpath in self._ready:
            return
        target = self.path / relpath
        expected = record.sha256 if record is not None else None
        # a cached shard is reused when its bytes are the listed ones; prompts (no digest) are fetched anew
        cached = (record is not None and target.exists() and target.stat().st_size == record.bytes
                  and sha256_file(target) == expected)
        if not cached:
            with _storage(self._location, "reading"):
                try:
                    digest = _download(self._fs, self._location.key(relpath), target)
                except FileNotFoundError:
                    raise RunFormatError(f"{self.url}/{relpath} is listed by the run but missing from the bucket; "
                                         "re-run the extraction to resume it") from None
            if expected is not None and digest != expected:
                with contextlib.suppress(OSError):
                    os.unlink(target)
                raise RunFormatError(f"{self.url}/{relpath} does not match the sha256 in its manifest; the object "
                                     "was changed outside neuronmap: re-extract with --overwrite")
        self._ready.add(relpath)


def verify_remote_run(url: Any) -> Any:
    """`verify_run` for a run on object storage: every listed object is downloaded into the cache and
    checked against its sha256, then the local copy is checked as a local run is. Problems are
    reported, never raised (as `verify_run`)."""
    from .manifest import write_manifest
    from .verify import verify_run

    run = open_remote_run(url)
    fetched, failed = [], []
    for relpath, record in [(PROMPTS_NAME, None), *((shard.path, shard) for shard in run.manifest.shards)]:
        try:
            run._fetch(relpath, record)
        except RunFormatError as error:
            fetched.append(str(error))
            failed.append(relpath)
    write_manifest(run.path, run.manifest)
    report = verify_run(run.path)
    report.path = run.url
    report.problems = fetched + [p for p in report.problems if not any(relpath in p for relpath in failed)]
    report.ok = not report.problems
    return report


def open_remote_run(url: Any, require_complete: bool = False) -> RemoteRun:
    """Open the run at `s3://bucket/prefix` (what `open_run` does for a local folder)."""
    location = parse_url(url)
    fs = filesystem()
    manifest = _read_manifest(fs, location)
    if manifest is None:
        raise RunFormatError(f"{location.url} has no {MANIFEST_NAME}: it is not a NeuronMap run")
    if require_complete and manifest.status != "complete":
        detail = f": {manifest.error}" if manifest.error else ""
        raise RunFormatError(f"run {location.url} is {manifest.status}{detail}; re-run the same extract command to "
                             "resume it")
    cache = cache_dir(location)
    cache.mkdir(parents=True, exist_ok=True)
    return RemoteRun(location, fs, cache, manifest)
