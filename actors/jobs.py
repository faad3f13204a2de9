"""Send `neuronmap` commands to a Ray cluster as Ray Jobs and follow them.

`neuronmap submit -- extract ...` turns the arguments after `--` into the job's entrypoint
(`neuronmap extract ...`), so the job runs the very same CLI on the cluster, where the extraction
joins the cluster with `--address auto`. Everything here talks to the cluster's job server (the
dashboard's HTTP port, 8265 by default) through the Ray Jobs SDK.

An unreachable address fails within seconds with a one-line `ConfigError` instead of hanging in
the SDK's retries: the TCP port is probed first.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import yaml

from neuronmap.errors import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_GRACE_S = 30.0


def resolve_address(address: str | None) -> str:
    """The job server URL: `--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS (http), else local."""
    candidate = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not candidate and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        candidate = os.environ["RAY_ADDRESS"]
    candidate = candidate or DEFAULT_ADDRESS
    if "://" not in candidate:
        candidate = f"http://{candidate}"
    parsed = urlparse(candidate)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"--address {candidate!r} is not a job server URL; use http://HOST:8265 (the Ray dashboard port)"
        )
    return candidate


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Raise ConfigError unless a TCP connection to the job server opens within `timeout` seconds."""
    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return
    except OSError as error:
        raise ConfigError(
            f"no Ray job server answers at {address} ({error.strerror or error}); start one with "
            "`ray start --head --dashboard-host 127.0.0.1` or pass --address http://HOST:8265"
        ) from None


def enable_token_auth_if_available() -> None:
    """Send the local Ray auth token when one exists and RAY_AUTH_MODE is unset.

    A `ray start` on a machine that has ~/.ray/auth_token turns token authentication on by itself;
    the job client only sends the token with RAY_AUTH_MODE=token, so mirror the server's choice.
    """
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def client(address: str | None = None) -> Any:
    """A connected `JobSubmissionClient` (after a fast reachability probe)."""
    from ray.job_submission import JobSubmissionClient

    enable_token_auth_if_available()

    url = resolve_address(address)
    check_reachable(url)
    return JobSubmissionClient(url)


def load_runtime_env(path: str | Path | None, working_dir: str | Path | None) -> dict[str, Any]:
    """Read a runtime_env YAML/JSON file and add `working_dir`; errors name the file and the fix."""
    env: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"runtime env file {path} does not exist; pass a YAML file like cluster/runtime_env.yaml")
        try:
            env = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"runtime env file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(env, dict):
            raise ConfigError(f"runtime env file {path} must hold a mapping (pip, env_vars, working_dir, ...)")
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"--working-dir {working_dir} is not a folder")
        env["working_dir"] = str(working_dir)
    return env


def submit(args: Sequence[str], address: str | None = None, working_dir: str | Path | None = None,
           runtime_env: str | Path | None = None, submission_id: str | None = None) -> str:
    """Submit `neuronmap <args>` as a Ray Job; return its submission id."""
    if not args:
        raise ConfigError("nothing to submit: give the neuronmap command after `--`, e.g. "
                          "`neuronmap submit -- extract -m gpt2 -p prompts.txt -o runs/x`")
    words = list(args)
    if words[0] == "neuronmap":
        words = words[1:]
    entrypoint = "neuronmap " + " ".join(shlex.quote(word) for word in words)
    env = load_runtime_env(runtime_env, working_dir)
    job_client = client(address)
    # A freshly started head answers HTTP before its job agent is up ("No available agent to submit
    # job"): give it a bounded grace period instead of failing the user's first submission.
    deadline = time.monotonic() + AGENT_GRACE_S
    while True:
        try:
            return job_client.submit_job(entrypoint=entrypoint, runtime_env=env or None, submission_id=submission_id)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Every job the cluster knows: id, status, entrypoint, start and end times (ms since epoch)."""
    jobs = client(address).list_jobs()
    return [
        {"id": job.submission_id or job.job_id, "status": str(job.status.value if hasattr(job.status, "value") else job.status),
         "entrypoint": job.entrypoint, "start_time": job.start_time, "end_time": job.end_time, "message": job.message}
        for job in jobs
    ]


def _known(job_client: Any, job_id: str) -> None:
    known = {job.submission_id for job in job_client.list_jobs()}
    if job_id not in known:
        raise ConfigError(f"no job {job_id!r} on this cluster; `neuronmap jobs list` shows the ids")


def status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """Status and message of one job."""
    job_client = client(address)
    _known(job_client, job_id)
    info = job_client.get_job_info(job_id)
    state = info.status.value if hasattr(info.status, "value") else str(info.status)
    return {"id": job_id, "status": state, "message": info.message, "entrypoint": info.entrypoint}


def logs(job_id: str, address: str | None = None) -> str:
    """Everything the job printed so far."""
    job_client = client(address)
    _known(job_client, job_id)
    return job_client.get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop a job; True when a stop was requested."""
    job_client = client(address)
    _known(job_client, job_id)
    return bool(job_client.stop_job(job_id))


def wait(job_id: str, address: str | None = None, timeout: float = 600.0, poll: float = 1.0) -> dict[str, Any]:
    """Poll until the job ends or `timeout` seconds pass; return the last status."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(job_id, address)
        if current["status"] in TERMINAL or time.monotonic() > deadline:
            return current
        time.sleep(poll)
