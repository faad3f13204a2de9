"""`neuronmap dashboard` refuses an address it cannot serve on in one line (exit 2), before Dash starts."""

from __future__ import annotations

import socket

import pytest

from neuronmap.cli import main


@pytest.fixture
def no_app(monkeypatch):
    """Fail the test if the app is built: every case below must stop before."""
    import dashboards.app

    def refuse(*_args, **_kwargs):
        raise AssertionError("the dashboard app was built despite a bad address")

    monkeypatch.setattr(dashboards.app, "create_app", refuse)


@pytest.mark.parametrize("port", ["0", "99999", "-1"])
def test_port_out_of_range(runs_dir, no_app, capsys, port):
    assert main(["dashboard", "--runs-dir", str(runs_dir[0]), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --port {port} is not a TCP port: use 1-65535") and "\n" not in err


def test_port_in_use(runs_dir, no_app, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--runs-dir", str(runs_dir[0]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: port {port} on 127.0.0.1 is already in use (another server?): stop it or pass another --port"


def test_host_that_cannot_be_bound(runs_dir, no_app, capsys):
    assert main(["dashboard", "--runs-dir", str(runs_dir[0]), "--host", "999.1.1.1", "--port", "8123"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 999.1.1.1:8123:") and "\n" not in err
