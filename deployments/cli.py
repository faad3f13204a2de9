"""`neuronmap serve`: start the Serve application locally (or on a cluster), registered as a CLI plugin.

The core package never imports Ray or FastAPI; it finds this command through the `neuronmap.cli`
entry point group (pyproject.toml), like `submit` and `jobs` from `actors`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from neuronmap.errors import ConfigError
from neuronmap.listen import check_listen

console = Console()


def settings_from_options(**values: Any) -> Any:
    """ServeSettings (keys resolved) from the CLI's option values; ConfigError on a bad combination."""
    from .settings import ServeSettings

    auth = "off" if values.pop("no_auth") else "auto"
    batching = {"enabled": not values.pop("no_batching"), "max_batch_size": values.pop("max_batch_size"),
                "batch_wait_timeout_s": values.pop("batch_wait_ms") / 1000.0}
    limits = {"max_texts": values.pop("max_texts"), "max_chars": values.pop("max_chars"),
              "max_body_bytes": values.pop("max_body_bytes")}
    for name in ("runs_dir", "api_keys_file", "audit_log"):
        if values.get(name) is not None:
            values[name] = str(Path(values[name]).expanduser().absolute())
    values = {k: v for k, v in values.items() if v is not None}
    return ServeSettings.parse({**values, "auth": auth, "batching": batching, "limits": limits}).resolved()


def check_runs_dir(runs_dir: str, given: bool) -> None:
    """A runs folder that is a file, or one the user named that is not there, is a mistake; the default
    `runs` may be missing (a server for /v1/extract only)."""
    path = Path(runs_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--runs-dir {runs_dir} is a file, not a folder: pass the folder that holds your runs")
    if given and not path.exists():
        raise ConfigError(f"--runs-dir {runs_dir} does not exist: pass the folder that holds your runs "
                          "(e.g. --runs-dir runs)")


def serve_until_stopped(settings: Any, port: int, address: str | None, ready: Any = None) -> None:
    """Connect to (or start) Ray, start Serve on settings.host:port, deploy, wait for Ctrl-C or SIGTERM,
    tear down (Serve, then the embedded Ray cluster when this process started one)."""
    from actors import options as ray_options
    from actors.cluster import ray_session

    from . import options
    from .app import build_app

    def stop(signum: int, frame: Any) -> None:  # `docker stop`, systemd: tear down like Ctrl-C
        raise KeyboardInterrupt

    need = settings.model_num_cpus * settings.model_replicas * max(1, len(settings.models)) + 1
    with ray_session(address, num_cpus=need), ray_options.quiet_logs():
        previous = signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own handler
        options.start(settings.host, port)
        try:
            options.run(build_app(settings))
            if ready is not None:
                ready()
            while True:
                time.sleep(1.0)
        finally:
            signal.signal(signal.SIGTERM, previous)
            options.shutdown()


def register(app: typer.Typer) -> None:
    """Add `serve` to the `neuronmap` app."""

    @app.command()
    def serve(
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder whose sub-folders are the runs served."),
        model: list[str] = typer.Option([], "--model", "-m", help="Model served by /v1/extract (repeatable): "
                                        "SOURCE or NAME=SOURCE (registry name, local folder or hub id); "
                                        "requests name it NAME (or SOURCE)."),
        host: str = typer.Option("127.0.0.1", help="Address the HTTP proxy binds; not loopback needs API keys."),
        port: int = typer.Option(8000, help="HTTP port."),
        address: Optional[str] = typer.Option(None, help="Ray cluster: auto | HOST:PORT (default: an embedded "
                                              "local cluster)."),
        replicas: int = typer.Option(1, help="Replicas per model deployment."),
        num_cpus: float = typer.Option(1.0, "--cpus-per-replica", help="CPUs reserved per model replica."),
        num_gpus: float = typer.Option(0.0, "--gpus-per-replica", help="GPUs reserved per model replica."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
        max_batch_size: int = typer.Option(32, help="Requests merged into one model call."),
        batch_wait_ms: float = typer.Option(5.0, help="Longest wait for a batch to fill, in ms."),
        no_batching: bool = typer.Option(False, "--no-batching", help="One model call per request."),
        max_texts: int = typer.Option(64, help="Texts per /v1/extract request."),
        max_chars: int = typer.Option(2000, help="Characters per text."),
        max_body_bytes: int = typer.Option(1_000_000, help="Request body limit (413 above)."),
        api_keys_file: Optional[Path] = typer.Option(None, help="API keys: id:key per line, or a JSON/YAML "
                                                     "mapping (also NEURONMAP_API_KEYS=id:key,...)."),
        no_auth: bool = typer.Option(False, "--no-auth", help="Serve without API keys even on a public address."),
        rate_limit: float = typer.Option(0.0, help="Requests per minute per API key (0: no limit)."),
        audit_log: Optional[Path] = typer.Option(None, help="Also append the audit lines to this file."),
    ) -> None:
        """Serve extraction, runs and analyses over HTTP (Ray Serve + FastAPI); Ctrl-C stops it."""
        settings = settings_from_options(
            runs_dir=runs_dir, models=list(model), host=host, device=device, model_replicas=replicas,
            model_num_cpus=num_cpus, model_num_gpus=num_gpus, no_batching=no_batching,
            max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_texts=max_texts, max_chars=max_chars,
            max_body_bytes=max_body_bytes, api_keys_file=api_keys_file, no_auth=no_auth,
            rate_limit_per_minute=rate_limit, audit_log=audit_log)
        check_runs_dir(settings.runs_dir, given=runs_dir != Path("runs"))
        check_listen(host, port)
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        url = f"http://{shown}:{port}"

        def ready() -> None:
            auth = "API keys required" if settings.auth_enabled else "no API keys"
            console.print(f"[bold green]serving[/] {url}  (models: {', '.join(settings.served_models()) or 'none'}; "
                          f"runs: {settings.runs_dir}; {auth})\n  {url}/docs  {url}/healthz  {url}/metrics  "
                          "- Ctrl-C stops")

        console.print(f"starting Ray Serve on {host}:{port} ...")
        try:
            serve_until_stopped(settings, port, address, ready)
        except KeyboardInterrupt:
            console.print("stopped")
