"""What a NeuronMap Serve application is configured with: one pydantic model, `ServeSettings`.

The same settings come from `neuronmap serve` options, from the `args:` of an application in
`serve_config.yaml`, or from Python (`build_app(settings)`). They travel to every replica as a plain
dict, so they hold no secrets: API keys are read once where the application is built (environment
variable or key file) and only their sha256 digests are passed on.

Key sources (`NEURONMAP_API_KEYS` or `api_keys_file`): ``id:key`` pairs separated by commas or new
lines, or bare keys (their id is then ``key-<8 hex of the digest>``); a ``.json``/``.yaml`` file may
also hold a mapping ``{id: key}``. Authentication is off by default when the server binds a loopback
address and no key is configured; binding another address without keys is refused unless
``auth="off"`` says so explicitly.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neuronmap.errors import ConfigError

KEYS_ENV = "NEURONMAP_API_KEYS"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingSettings(_Strict):
    """Dynamic batching of /v1/extract requests: each ingress replica merges concurrent requests to one
    model (`@serve.batch`) into one call to a model replica."""

    enabled: bool = True
    max_batch_size: int = Field(32, ge=1, le=1024, description="requests merged into one model call")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1.0, description="longest wait for a batch to fill")
    max_concurrent_batches: Optional[int] = Field(
        None, ge=1, le=1024, description="model calls one ingress replica keeps in flight per model; default 2 per "
        "model replica (model_replicas, or model_autoscaling's max_replicas): set it when a deployment override "
        "in serve_config.yaml changes the model's replicas")


class Limits(_Strict):
    """Bounds on what one request may ask; larger requests are refused with a 4xx JSON error."""

    max_texts: int = Field(64, ge=1, le=4096, description="texts per /v1/extract request")
    max_chars: int = Field(2000, ge=1, le=1_000_000, description="characters per text")
    max_layers: int = Field(64, ge=1, le=4096, description="layers one request may resolve to")
    max_tokens: int = Field(512, ge=2, le=1_000_000, description="tokens per text (longer texts are truncated)")
    max_output_values: int = Field(20_000_000, ge=1, description="activation values one response may hold")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body size (413 above)")


class ServeSettings(_Strict):
    """Configuration of one NeuronMap Serve application (see the module docstring)."""

    runs_dir: str = Field("runs", description="folder whose sub-folders are the runs served")
    models: list[str] = Field(default_factory=list, description="models served by /v1/extract: SOURCE or "
                              "NAME=SOURCE (registry name, local folder or hub id; requests name NAME)")
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds (decides the auth default)")
    device: str = "auto"
    model_dtype: str = "auto"
    forward_batch_size: Optional[int] = Field(None, ge=1, le=4096, description="texts per forward pass inside a "
                                              "merged batch (length-sorted); default 8 on CPU, 32 on GPU")
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    limits: Limits = Field(default_factory=Limits)
    auth: Literal["auto", "on", "off"] = "auto"
    api_keys_file: Optional[str] = None
    api_key_hashes: dict[str, str] = Field(default_factory=dict, description="key id -> sha256 hex of the key")
    rate_limit_per_minute: float = Field(0, ge=0, description="requests per minute per key and per ingress "
                                         "replica (each replica keeps its own buckets); 0 = no limit")
    rate_limit_burst: Optional[int] = Field(None, ge=1, description="bucket size; default max(1, rate/6)")
    audit_log: Optional[str] = Field(None, description="also append audit lines to this file")
    model_replicas: int = Field(1, ge=1)
    model_num_cpus: float = Field(1.0, ge=0)
    model_num_gpus: float = Field(0.0, ge=0)
    model_autoscaling: Optional[dict[str, Any]] = Field(None,
                                                        description="Serve autoscaling_config of model deployments")
    ingress_replicas: int = Field(1, ge=1)
    job_workers: int = Field(1, ge=1, le=64, description="analyses run at once")

    @classmethod
    def parse(cls, values: "ServeSettings | dict[str, Any] | None") -> "ServeSettings":
        """Validated settings; a bad value raises ConfigError naming the field."""
        if isinstance(values, cls):
            return values
        try:
            return cls.model_validate(values or {})
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "settings"
            raise ConfigError(f"serve setting {where}: {first['msg']} (got {first.get('input')!r})") from None

    def served_models(self) -> dict[str, str]:
        """{name clients use: source to load} from `models` (``NAME=SOURCE`` or just ``SOURCE``)."""
        served: dict[str, str] = {}
        for spec in self.models:
            name, sep, source = spec.partition("=")
            name, source = (name.strip(), source.strip()) if sep else (spec.strip(), spec.strip())
            if not name or not source:
                raise ConfigError(f"model {spec!r}: write SOURCE or NAME=SOURCE, e.g. tiny=models/tiny-gpt2")
            if name in served:
                raise ConfigError(f"model name {name!r} is given twice; name each model once (NAME=SOURCE)")
            served[name] = source
        return served

    @property
    def auth_enabled(self) -> bool:
        return self.auth != "off" and bool(self.api_key_hashes)

    def resolved(self, environ: dict[str, str] | None = None) -> "ServeSettings":
        """Keys read from the environment / key file into digests, and the auth rule applied.

        Raises ConfigError for `auth="on"` without keys, or a non-loopback host without keys in
        `auth="auto"` mode (the fix is in the message).
        """
        environ = os.environ if environ is None else environ
        hashes = dict(self.api_key_hashes)
        if self.auth != "off":
            hashes.update(hash_keys(parse_keys(environ.get(KEYS_ENV, ""), source=f"${KEYS_ENV}")))
            if self.api_keys_file:
                hashes.update(hash_keys(read_key_file(self.api_keys_file)))
        if not hashes and self.auth == "on":
            raise ConfigError(f"auth='on' but no API keys: set {KEYS_ENV}=id:key or pass --api-keys-file FILE")
        if not hashes and self.auth == "auto" and not is_loopback(self.host):
            raise ConfigError(f"serving on {self.host} without API keys: set {KEYS_ENV}=id:key or "
                              "--api-keys-file FILE, or pass --no-auth to serve anyone who can reach the port")
        self.served_models()  # a malformed model list fails here, where the app is built
        return self.model_copy(update={"api_key_hashes": hashes if self.auth != "off" else {}})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, source: str = "keys") -> dict[str, str]:
    """``id:key`` / bare ``key`` entries separated by commas or new lines -> {id: key}."""
    keys: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        key_id, sep, key = entry.partition(":")
        if not sep:
            key_id, key = f"key-{key_digest(entry)[:8]}", entry
        key_id, key = key_id.strip(), key.strip()
        if not key_id or not key:
            raise ConfigError(f"bad API key entry in {source}: write id:key or a bare key, one per line or comma")
        keys[key_id] = key
    return keys


def read_key_file(path: str | os.PathLike) -> dict[str, str]:
    """{id: key} from a JSON/YAML mapping file or an ``id:key`` per line text file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read API key file {path}: {error.strerror or error}") from None
    if not text.strip():  # a key file that holds no key would silently turn auth off
        raise ConfigError(f"API key file {path} holds no keys: write id:key lines (or a JSON/YAML mapping), "
                          "or leave --api-keys-file out")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        import yaml

        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as error:
            raise ConfigError(f"API key file {path} is not valid {path.suffix[1:]}: {error}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
            raise ConfigError(f"API key file {path} must map key ids to non-empty key strings")
        return {str(k): v for k, v in data.items()}
    return parse_keys(text, source=str(path))


def hash_keys(keys: dict[str, str]) -> dict[str, str]:
    return {key_id: key_digest(key) for key_id, key in keys.items()}
