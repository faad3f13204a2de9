"""Check that a server can listen on HOST:PORT before starting it, so a mistake is one clear line.

Why here: both servers (`neuronmap serve`, Ray Serve; `neuronmap dashboard`, Flask) start heavy
machinery before they bind, then fail with a traceback or, for Ray's proxy, which binds with
SO_REUSEPORT, not at all: a second server would share a taken port and split its requests. A plain
bind of the same address first tells.
"""

from __future__ import annotations

import errno
import socket

from .errors import ConfigError


def check_listen(host: str, port: int, example: int = 8000) -> None:
    """ConfigError for a port out of 1-65535 (0 too: no URL to give), a taken port, or a host that
    cannot be bound (not an address of this machine, or a name that does not resolve)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port: use 1-65535, e.g. --port {example}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use (another server?): stop it or pass "
                                  "another --port") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}; pass another --host or "
                              "--port") from None
