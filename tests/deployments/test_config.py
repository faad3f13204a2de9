"""serve_config.yaml, the `neuronmap serve` plugin, and the core's independence from Ray/Serve."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from neuronmap.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[2] / "deployments" / "serve_config.yaml"


def test_serve_config_parses_and_its_import_path_builds_the_app(tmp_path, monkeypatch):
    from ray.serve import Application

    from deployments import options
    from deployments.app import deployment_names
    from deployments.settings import ServeSettings

    data = yaml.safe_load(CONFIG.read_text())
    parsed = options.parse_deploy_config(data)  # Serve's own schema for `serve deploy`
    (app_config,) = parsed.applications
    module_name, _, attr = app_config.import_path.partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    args = {**app_config.args, "runs_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="without API keys"):  # 0.0.0.0 and no key: refused
        builder(args)
    monkeypatch.setenv("NEURONMAP_API_KEYS", "alice:some-key")
    try:  # what `serve deploy` calls with the config's args
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call_builder
    except ImportError:  # private in Ray; fall back to calling the builder the same way
        def call_builder(function, values):
            return function(values)
    app = call_builder(builder, args)
    assert isinstance(app, Application)
    names = set(deployment_names(ServeSettings.parse(args)).values())
    assert {d.name for d in app_config.deployments} <= names
    assert ServeSettings.parse(app_config.args).batching.max_batch_size == 32


def test_serve_is_a_cli_plugin_of_the_installed_package():
    points = {(e.group, e.name): e.value for dist in metadata.distributions() if dist.metadata["Name"] == "neuronmap"
              for e in dist.entry_points}
    assert points.get(("neuronmap.cli", "serve")) == "deployments.cli:register"


def test_serve_command_help_and_option_mistakes():
    import typer
    from typer.testing import CliRunner

    from deployments import cli

    app = typer.Typer()
    cli.register(app)

    @app.command()
    def other() -> None:  # a second command keeps `serve` a subcommand
        pass

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--runs-dir", "--model", "--host", "--port", "--api-keys-file", "--rate-limit", "--no-batching"):
        assert option in result.output
    base = dict(runs_dir=Path("runs"), models=[], host="0.0.0.0", device="auto", model_replicas=1, model_num_cpus=1.0,
                model_num_gpus=0.0, no_batching=False, max_batch_size=32, batch_wait_ms=5.0, max_texts=64,
                max_chars=2000, max_body_bytes=1_000_000, api_keys_file=None, rate_limit_per_minute=0.0,
                audit_log=None)
    with pytest.raises(ConfigError, match="--no-auth"):
        cli.settings_from_options(**base, no_auth=False)
    settings = cli.settings_from_options(**{**base, "no_batching": True, "batch_wait_ms": 20.0}, no_auth=True)
    assert not settings.auth_enabled and not settings.batching.enabled
    assert settings.batching.batch_wait_timeout_s == pytest.approx(0.02) and Path(settings.runs_dir).is_absolute()


def test_core_package_imports_no_ray_serve_or_fastapi():
    """The CLI loads the `serve` plugin (deployments.cli: typer only); Ray and FastAPI wait for `serve`."""
    code = ("import sys, neuronmap, neuronmap.cli, neuronmap.extraction, neuronmap.store, neuronmap.analysis.runner\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi', 'starlette', 'uvicorn')\n"
            "             or m in ('deployments.app', 'deployments.http'))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ports_and_runs_folders_serve_cannot_use_are_refused_before_ray_starts(tmp_path):
    import socket

    from deployments import cli

    for port in (0, -1, 70000):
        with pytest.raises(ConfigError, match=f"--port {port} is not a TCP port"):
            cli.check_listen("127.0.0.1", port)
    with socket.socket() as taken:  # Ray's proxy binds with SO_REUSEPORT: it would share this port silently
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            cli.check_listen("127.0.0.1", port)
    cli.check_listen("127.0.0.1", port)  # free again
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        cli.check_runs_dir(str(tmp_path / "afile"), given=False)
    with pytest.raises(ConfigError, match="does not exist"):
        cli.check_runs_dir(str(tmp_path / "missing"), given=True)
    cli.check_runs_dir(str(tmp_path / "missing"), given=False)  # the default `runs`: a server for /v1/extract only
