"""A small real HTTP server speaking Ollama's wire format, for testing the Ollama client.

It binds 127.0.0.1 on a free port, answers each request with the next action of a script (then the
default action), records every request, and always stops: on ``stop()``, on leaving the ``with``
block, or by itself after ``lifetime`` seconds. Every loop in it is bounded (fixed chunk lists,
delays that end early when the server stops, a per-connection socket timeout).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Action:
    """What the server does with one request.

    ``delay``: seconds to wait before answering. ``status`` + ``error``: an error answer
    ``{"error": ...}``. ``stream``: NDJSON chunks (``response`` pieces) sent with chunked encoding,
    then a ``done`` line unless ``cut``; ``stream_error`` sends ``{"error": ...}`` after the chunks.
    ``text``: the answer, sent whole or streamed line by line (default: built from the request). ``raw``: body bytes sent as is.
    """

    delay: float = 0.0
    status: int = 200
    error: str | None = None
    stream: list[str] | None = None
    cut: bool = False
    stream_error: str | None = None
    text: str | None = None
    raw: bytes | None = None


@dataclass
class Request:
    method: str
    path: str
    body: dict[str, Any] | None


def default_text(body: dict[str, Any]) -> str:
    """Three distinct question lines that depend on the prompt and the options' seed."""
    seed = (body.get("options") or {}).get("seed", 0)
    topic = body.get("prompt", "")[-20:].strip()
    return "\n".join(f"{i + 1}. Question number {seed}-{i} about {topic}?" for i in range(3))


@dataclass
class FakeOllama:
    script: list[Action] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["llama3.2:latest", "qwen2.5:0.5b"])
    lifetime: float = 30.0
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._watchdog = threading.Timer(self.lifetime, self.stop)
        self._watchdog.daemon = True

    def __enter__(self) -> FakeOllama:
        self._thread.start()
        self._watchdog.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()

    def next_action(self, request: Request) -> Action:
        with self._lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else Action()

    def generate_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path == "/api/generate"]


def _handler_for(fake: FakeOllama) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked transfer encoding for streams
        timeout = 5  # a silent client cannot hold a handler thread for long

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self._answer(None)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self._answer(json.loads(raw) if raw else None)

        def _answer(self, body: dict[str, Any] | None) -> None:
            action = fake.next_action(Request(self.command, self.path, body))
            if action.delay and fake._stopping.wait(action.delay):
                return
            try:
                if self.path == "/api/tags":
                    self._json(200, {"models": [{"name": m, "model": m} for m in fake.models]})
                elif self.path == "/api/version":
                    self._json(200, {"version": "0.0.0-fake"})
                elif self.path != "/api/generate":
                    self._plain(404, b"404 page not found")
                elif action.raw is not None:
                    self._plain(action.status, action.raw)
                elif action.error is not None:
                    self._json(action.status, {"error": action.error})
                elif action.stream is not None or (body or {}).get("stream", True):
                    self._stream(body or {}, action)
                else:
                    text = action.text if action.text is not None else default_text(body or {})
                    self._json(200, {"model": (body or {}).get("model"), "created_at": "2025-01-01T00:00:00Z",
                                     "response": text, "done": True, "done_reason": "stop"})
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def _json(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _plain(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, body: dict[str, Any], action: Action) -> None:
            text = action.text if action.text is not None else default_text(body)
            pieces = action.stream if action.stream is not None else [line + "\n" for line in text.split("\n")]
            model = body.get("model")
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            lines = [{"model": model, "created_at": "2025-01-01T00:00:00Z", "response": p, "done": False}
                     for p in pieces]
            if action.stream_error is not None:
                lines.append({"error": action.stream_error})
            elif not action.cut:
                lines.append({"model": model, "created_at": "2025-01-01T00:00:00Z", "response": "", "done": True,
                              "done_reason": "stop", "eval_count": len(pieces)})
            for obj in lines:  # bounded: one chunk per line
                data = (json.dumps(obj) + "\n").encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            if action.cut:
                self.close_connection = True

    return Handler


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
