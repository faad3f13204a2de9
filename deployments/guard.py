"""The door of the HTTP API: request size, API keys, rate limits, metrics and the audit log.

`Guard` is one ASGI middleware (outside the routes, inside Starlette's error handler). For every
HTTP request, in order:

1. a ``Content-Length`` above the limit -> 413 (before anything is read);
2. with API keys configured, a missing or unknown key (``Authorization: Bearer KEY`` or
   ``X-API-Key: KEY``) -> 401, except on the open routes (/healthz, /openapi.json, /docs);
3. the key's token bucket (`RateLimiter`; anonymous clients share one bucket per client address)
   empty -> 429 with ``Retry-After`` in whole seconds (/healthz is never limited);
4. the body is read (a chunked body over the limit -> 413) and the request handed to the routes.

Whatever the outcome, one audit line (`neuronmap.serve.audit` logger: key id, method, route
template, status, latency) and the request metrics are recorded. `ApiKeys` and `RateLimiter` are
plain classes with an injectable clock, unit-tested without HTTP.

The token buckets live in the memory of each ingress replica, so the limit holds per replica: with
`ingress_replicas: N` a key whose requests the proxy spreads over every replica gets up to N times
the rate (the default, one ingress replica, enforces it exactly). A bucket shared by all replicas
would be one more actor round trip on every request, which on the loopback benchmark costs about
what the whole handle call to a model replica does (benchmarks/BENCHMARKS.md, "Serve").
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from typing import Any, Callable

from .settings import key_digest

AUDIT_LOGGER = "neuronmap.serve.audit"
OPEN_ROUTES = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
UNLIMITED_ROUTES = frozenset({"/healthz"})
MAX_BUCKETS = 10_000


class ApiKeys:
    """Key id lookup by sha256 digest, compared in constant time; disabled when empty."""

    def __init__(self, hashes: dict[str, str] | None = None):
        self._items = list((hashes or {}).items())

    @property
    def enabled(self) -> bool:
        return bool(self._items)

    def identify(self, presented: str | None) -> str | None:
        """The id of `presented`, or None when it is missing or matches no key."""
        if not presented:
            return None
        digest = key_digest(presented)
        found = None
        for key_id, stored in self._items:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, stored):
                found = key_id
        return found


def presented_key(headers: dict[str, str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip() or None


class RateLimiter:
    """Token buckets per key: `per_minute` requests a minute on average, bursts up to `burst`.

    `acquire(key)` takes one token and returns 0.0, or returns the seconds until a token is
    available (nothing taken). Disabled (always 0.0) when `per_minute` is 0.
    """

    def __init__(self, per_minute: float = 0.0, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, math.ceil(per_minute / 6)))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str) -> float:
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
                    self._buckets.clear()  # forget idle anonymous clients rather than grow without bound
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class _BodyTooLarge(Exception):
    pass


def error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message, "detail": None}).encode()


async def send_error(send: Callable, status: int, code: str, message: str,
                     headers: dict[str, str] | None = None) -> None:
    body = error_body(status, code, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware (see the module docstring). `routes` is the app's route list (for templates)."""

    def __init__(self, app: Any, *, routes: list, keys: ApiKeys, limiter: RateLimiter, max_body_bytes: int,
                 metrics: Any = None, audit: logging.Logger | None = None):
        self.app, self.routes, self.keys, self.limiter = app, routes, keys, limiter
        self.max_body_bytes, self.metrics = max_body_bytes, metrics
        self.audit = audit or logging.getLogger(AUDIT_LOGGER)

    def route_of(self, scope: dict) -> str:
        """The matched route's template (`/v1/runs/{run_id}`), or `<unmatched>` (bounded label values)."""
        from starlette.routing import Match

        for route in self.routes:
            try:
                match, _ = route.matches(scope)
            except Exception:  # noqa: BLE001 - a route that cannot match this scope
                continue
            if match == Match.FULL:
                return getattr(route, "path", "<unmatched>")
        return "<unmatched>"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = self.route_of(scope)
        state = {"status": 500, "sent": False, "key": "-"}

        async def tracked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["sent"] = message["status"], True
            await send(message)

        try:
            await self._handle(scope, receive, tracked_send, route, state)
        except _BodyTooLarge:
            if not state["sent"]:
                await send_error(tracked_send, 413, "payload_too_large",
                                 f"request body over {self.max_body_bytes} bytes; send fewer or shorter texts")
        finally:
            seconds = time.perf_counter() - started
            method = scope.get("method", "-")
            if self.metrics is not None:
                self.metrics.observe_request(route, method, state["status"], seconds)
            client = (scope.get("client") or ("-",))[0]
            self.audit.info("key=%s method=%s route=%s status=%s latency_ms=%.1f client=%s", state["key"], method,
                            route, state["status"], seconds * 1000, client)

    async def _handle(self, scope: dict, receive: Callable, send: Callable, route: str, state: dict) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body_bytes):
            await send_error(send, 413, "payload_too_large", f"request body of {length[:20]} bytes is over the "
                             f"{self.max_body_bytes}-byte limit; send fewer or shorter texts")
            return
        if self.keys.enabled and route not in OPEN_ROUTES:
            key_id = self.keys.identify(presented_key(headers))
            if key_id is None:
                await send_error(send, 401, "unauthorized", "missing or unknown API key: send "
                                 "'Authorization: Bearer KEY' or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
                return
            state["key"] = key_id
        elif not self.keys.enabled:
            state["key"] = "anonymous"
        if self.limiter.enabled and route not in UNLIMITED_ROUTES:
            bucket = state["key"] if self.keys.enabled else f"anonymous@{(scope.get('client') or ('-',))[0]}"
            wait = self.limiter.acquire(bucket)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await send_error(send, 429, "rate_limited", f"rate limit of {self.limiter.rate * 60:g} requests "
                                 f"per minute reached for key {state['key']}; retry in {retry} s",
                                 {"Retry-After": str(retry)})
                return
        body = await self._read_body(receive)
        if body is None:
            return  # the client went away
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Callable) -> bytes | None:
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
