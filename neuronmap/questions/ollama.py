"""A small client for Ollama's HTTP API, and question generation with it.

Wire format (https://docs.ollama.com/api): ``POST /api/generate`` with a JSON body
``{"model", "prompt", "stream", "options"}``. With ``"stream": false`` the answer is one JSON object
whose ``response`` holds the text; with ``"stream": true`` it is newline-delimited JSON
(``application/x-ndjson``), one object per chunk with a ``response`` piece, the last one with
``"done": true``. Errors are ``{"error": "..."}`` with an HTTP status (404 for an unknown model);
an error after streaming started arrives as a line ``{"error": "..."}`` under status 200.

The client uses only the standard library (``urllib``). ``timeout`` bounds every blocking step
(connect, and each read: the wait for the first byte and then between two stream chunks).
Transient failures (connection refused or reset, timeouts, HTTP 408/429/5xx, a stream cut before
``done``, an error line mid-stream) are retried ``retries`` times with exponential backoff
(``backoff * 2**k`` seconds, at most ``max_backoff``, plus a seeded jitter); other HTTP errors
(404 unknown model, 400 bad request) fail at once. Every failure the user sees is one
`OllamaError` line that says what to do.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from neuronmap.errors import ConfigError, NeuronMapError
from neuronmap.questions.filters import LengthFilter, UniqueTexts, check_count, clean_line
from neuronmap.questions.templates import check_seed

__all__ = ["DEFAULT_URL", "OllamaClient", "OllamaError", "OllamaModelNotFoundError", "OllamaTimeoutError",
           "OllamaUnavailableError", "default_ollama_prompts", "generate_ollama"]

DEFAULT_URL = "http://127.0.0.1:11434"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class OllamaError(NeuronMapError, RuntimeError):
    """The Ollama server failed or refused a request (the message says why and what to do)."""


class OllamaUnavailableError(OllamaError, ConnectionError):
    """No server answers at the URL (refused, reset, unresolvable host)."""


class OllamaTimeoutError(OllamaError, TimeoutError):
    """The server accepted the connection but did not answer within the timeout, on every attempt."""


class OllamaModelNotFoundError(OllamaError, LookupError):
    """The server does not have the model (HTTP 404): pull it with ``ollama pull``."""


class _Transient(Exception):
    """One failed attempt that is worth retrying; ``kind`` is refused|connection|timeout|server."""

    def __init__(self, kind: str, detail: str):
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail


def _one_line(text: Any, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OllamaClient:
    """Talks to one Ollama server.

    Parameters
    ----------
    url : str
        Base URL of the server, e.g. ``http://127.0.0.1:11434``.
    timeout : float
        Seconds any one blocking step may take (connect, first byte, gap between stream chunks).
    retries : int
        Extra attempts after a transient failure (0: try once).
    backoff, max_backoff : float
        Wait ``min(max_backoff, backoff * 2**k)`` seconds before retry ``k + 1``, times ``1 + jitter * u``
        with ``u`` from a ``random.Random(seed)``, so runs are reproducible.
    sleep : callable
        ``time.sleep`` (tests may pass a recorder).
    """

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 8.0, jitter: float = 0.1, seed: int = 0,
                 sleep: Callable[[float], None] = time.sleep):
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"Ollama URL {url!r} is not an http(s) URL: pass e.g. --ollama-url {DEFAULT_URL}")
        for name, value, allowed in (("timeout", timeout, "a positive number of seconds"),
                                     ("backoff", backoff, "a number of seconds >= 0"),
                                     ("max_backoff", max_backoff, "a number of seconds >= 0"),
                                     ("jitter", jitter, "a fraction >= 0")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (name == "timeout" and value == 0):
                raise ConfigError(f"{name}={value!r} is invalid: pass {allowed}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries={retries!r} is invalid: pass 0 or a positive integer")
        self.url = str(url).rstrip("/")
        self.timeout, self.retries = float(timeout), retries
        self.backoff, self.max_backoff, self.jitter = float(backoff), float(max_backoff), float(jitter)
        self._rng = random.Random(seed)
        self._sleep = sleep
        self.attempts = 0  # HTTP requests sent, retries included
        # Proxy settings from the environment must not capture a server on this machine.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    # ---------------------------------------------------------------------------------------- API
    def generate(self, model: str, prompt: str, *, options: dict[str, Any] | None = None, stream: bool = False,
                 system: str | None = None, on_chunk: Callable[[str], None] | None = None) -> str:
        """The model's full answer to ``prompt`` (``/api/generate``).

        ``options`` are Ollama's model options (``temperature``, ``seed``, ``num_predict``, ...).
        With ``stream=True`` the answer is read chunk by chunk and ``on_chunk`` gets each piece (a
        retried attempt starts the text over).
        """
        payload: dict[str, Any] = {"model": model, "prompt": prompt, "stream": bool(stream)}
        if options:
            payload["options"] = dict(options)
        if system is not None:
            payload["system"] = system
        answer = self._call("POST", "/api/generate", payload, stream=bool(stream), on_chunk=on_chunk, model=model)
        text = answer.get("response")
        if not isinstance(text, str):
            raise OllamaError(f"{self.url}/api/generate answered without a 'response' text ({_one_line(answer, 120)}): "
                              "is --ollama-url an Ollama server?")
        return text

    def list_models(self) -> list[str]:
        """Names of the models the server has (``GET /api/tags``)."""
        answer = self._call("GET", "/api/tags")
        return [str(m.get("name")) for m in answer.get("models") or [] if isinstance(m, dict) and m.get("name")]

    def version(self) -> str:
        """The server's version (``GET /api/version``)."""
        return str(self._call("GET", "/api/version").get("version", ""))

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        base = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return base * (1.0 + self.jitter * self._rng.random())

    # ---------------------------------------------------------------------------------- internals
    def _call(self, method: str, path: str, payload: dict | None = None, *, stream: bool = False,
              on_chunk: Callable[[str], None] | None = None, model: str | None = None) -> dict[str, Any]:
        failures: list[_Transient] = []
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.delay(attempt))
            try:
                return self._once(method, path, payload, stream, on_chunk, model)
            except _Transient as failure:
                failures.append(failure)
        raise self._give_up(failures)

    def _once(self, method: str, path: str, payload: dict | None, stream: bool,
              on_chunk: Callable[[str], None] | None, model: str | None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Content-Type": "application/json", "Accept": "application/x-ndjson, application/json"})
        self.attempts += 1
        try:
            response = self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            status, message = error.code, _error_text(error)
            error.close()
            if status in RETRY_STATUS:
                raise _Transient("server", f"HTTP {status}: {message}") from None
            raise self._http_error(status, message, path, model) from None
        except urllib.error.URLError as error:
            raise self._connection_failure(error.reason) from None
        except (TimeoutError, OSError, http.client.HTTPException) as error:
            raise self._connection_failure(error) from None
        with response:
            if stream:
                return self._read_stream(response, on_chunk)
            try:
                body = response.read()
            except (TimeoutError, OSError, http.client.HTTPException) as error:
                raise self._connection_failure(error) from None
        answer = self._parse(body, path)
        if "error" in answer:
            raise _Transient("server", f"error: {_one_line(answer['error'])}")
        return answer

    def _read_stream(self, response: Any, on_chunk: Callable[[str], None] | None) -> dict[str, Any]:
        pieces: list[str] = []
        final: dict[str, Any] = {}
        while True:  # ends at "done", at EOF, or when a read times out
            try:
                line = response.readline()
            except (TimeoutError, OSError, http.client.HTTPException) as error:
                raise self._connection_failure(error) from None
            if not line:
                raise _Transient("server", f"the stream ended before \"done\" after {len(pieces)} chunks")
            if not line.strip():
                continue
            chunk = self._parse(line, "/api/generate")
            if "error" in chunk:
                raise _Transient("server", f"error mid-stream: {_one_line(chunk['error'])}")
            piece = chunk.get("response") or ""
            if piece:
                pieces.append(piece)
                if on_chunk is not None:
                    on_chunk(piece)
            if chunk.get("done"):
                final = dict(chunk)
                break
        final["response"] = "".join(pieces)
        return final

    def _parse(self, body: bytes, path: str) -> dict[str, Any]:
        try:
            answer = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise OllamaError(f"{self.url}{path} answered with something that is not JSON "
                              f"({_one_line(body[:80].decode('utf-8', 'replace'), 80)!r}): "
                              "is --ollama-url an Ollama server?") from None
        if not isinstance(answer, dict):
            raise OllamaError(f"{self.url}{path} answered with a JSON {type(answer).__name__}, not an object: "
                              "is --ollama-url an Ollama server?")
        return answer

    def _connection_failure(self, reason: Any) -> Exception:
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return _Transient("timeout", "no answer in time")
        if isinstance(reason, ConnectionRefusedError):
            return _Transient("refused", "connection refused")
        if isinstance(reason, socket.gaierror):
            return OllamaUnavailableError(f"cannot resolve the host of {self.url} ({_one_line(reason)}): "
                                          "check --ollama-url")
        return _Transient("connection", _one_line(reason) or type(reason).__name__)

    def _http_error(self, status: int, message: str, path: str, model: str | None) -> OllamaError:
        if status == 404 and model is not None and "model" in message.lower():
            return OllamaModelNotFoundError(
                f"Ollama at {self.url} has no model {model!r} (HTTP 404: {message}): pull it with "
                f"`ollama pull {model}` or pass another --ollama-model{self._installed_hint()}")
        if status == 404:
            return OllamaError(f"{self.url}{path} answered HTTP 404 ({message}): is --ollama-url an Ollama server?")
        if status in (401, 403):
            return OllamaError(f"Ollama at {self.url} refused access (HTTP {status}: {message}): check the URL and "
                               "any proxy or credentials in front of it")
        return OllamaError(f"Ollama at {self.url} rejected the request (HTTP {status}: {message}): check "
                           "--ollama-model and the generation options")

    def _installed_hint(self) -> str:
        """"; installed: a, b" from one quick /api/tags request, or "" when that fails."""
        probe = OllamaClient(self.url, timeout=min(self.timeout, 5.0), retries=0)
        try:
            names = probe.list_models()
        except Exception:  # only a hint: never hide the real error behind another
            return ""
        return f"; installed: {', '.join(names[:10])}" if names else "; the server has no models yet"

    def _give_up(self, failures: list[_Transient]) -> OllamaError:
        last, n = failures[-1], len(failures)
        tries = f"{n} attempt{'s' if n > 1 else ''}"
        if last.kind in ("refused", "connection") and all(f.kind in ("refused", "connection") for f in failures):
            return OllamaUnavailableError(f"no Ollama server answers at {self.url}: start it with `ollama serve` "
                                          f"or pass --ollama-url ({last.detail}, {tries})")
        if last.kind == "timeout":
            return OllamaTimeoutError(f"Ollama at {self.url} did not answer within {self.timeout:g} s ({tries}): "
                                      "raise --timeout (loading a large model can take minutes) or check the server")
        return OllamaError(f"Ollama at {self.url} failed {tries} ({last.detail}): see the server's log "
                           "(`ollama serve` output) and retry")


def _error_text(error: urllib.error.HTTPError) -> str:
    """The ``error`` field of an HTTP error body, else the body's text, else the reason phrase."""
    try:
        body = error.read(64 * 1024)
    except Exception:
        body = b""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and parsed.get("error"):
            return _one_line(parsed["error"])
    except (ValueError, UnicodeDecodeError):
        pass
    return _one_line(body.decode("utf-8", "replace")) or str(error.reason)


# ---------------------------------------------------------------------------------------------
# question generation
# ---------------------------------------------------------------------------------------------
_TOPICS = ("science", "history", "geography", "everyday life", "food and cooking", "sports", "technology",
           "health", "music and art", "animals and nature", "money and work", "language and books")


def default_ollama_prompts(per_request: int = 5) -> list[tuple[str, str]]:
    """``(topic, instruction)`` pairs asking for ``per_request`` questions, one per line."""
    return [(topic, f"Write {per_request} different short questions about {topic}. Put each question on its own "
                    "line. Write only the questions: no numbering, no answers, no other text.") for topic in _TOPICS]


def generate_ollama(model: str, count: int, seed: int = 0, *, url: str = DEFAULT_URL,
                    prompts: Sequence[str] | None = None, max_new_tokens: int = 256, temperature: float = 0.8,
                    min_words: int | None = None, max_words: int | None = None, stream: bool = True,
                    split_lines: bool = True, timeout: float = 120.0, retries: int = 3,
                    max_requests: int | None = None, client: OllamaClient | None = None) -> pd.DataFrame:
    """``count`` distinct prompts written by an Ollama model.

    Requests cycle through ``prompts`` (default: instructions asking for questions on 12 topics) with
    Ollama options ``seed = seed * 1000003 + request``, ``temperature`` and ``num_predict =
    max_new_tokens``. Each answer is split into lines (``split_lines``), stripped of numbering and
    quotes, then de-duplicated and length-filtered. Answers are streamed by default, so ``timeout``
    bounds the silence between chunks rather than the whole (possibly long) generation. At most
    ``max_requests`` (default ``3 * count + 10``) requests are sent; fewer distinct prompts than
    ``count`` by then raises ConfigError. ``client`` (an `OllamaClient`) replaces ``url``, ``timeout``
    and ``retries``.

    Returns a DataFrame ``[text, family="ollama", model, source_prompt, topic (default prompts), request]``.
    """
    count, seed = check_count(count), check_seed(seed)
    length = LengthFilter(min_words, max_words)
    check_count(max_new_tokens, "max_new_tokens")
    if prompts is None:
        topics_prompts: list[tuple[str | None, str]] = list(default_ollama_prompts())
    else:
        topics_prompts = [(None, p) for p in prompts]
        if not topics_prompts or not all(isinstance(p, str) and p.strip() for _, p in topics_prompts):
            raise ConfigError("prompts must be a non-empty list of non-blank strings: check --prompts")
    limit = check_count(max_requests, "max_requests") if max_requests is not None else 3 * count + 10
    client = client or OllamaClient(url, timeout=timeout, retries=retries, seed=seed)
    found = UniqueTexts(length)
    for request in range(limit):
        topic, prompt = topics_prompts[request % len(topics_prompts)]
        options = {"seed": seed * 1_000_003 + request, "temperature": temperature, "num_predict": max_new_tokens}
        text = client.generate(model, prompt, options=options, stream=stream)
        for line in (text.splitlines() if split_lines else [text]):
            labels: dict[str, Any] = {"family": "ollama", "model": model, "source_prompt": prompt}
            if prompts is None:
                labels["topic"] = topic
            labels["request"] = request
            found.add(clean_line(line) if split_lines else text.strip(), **labels)
            if len(found) == count:
                return found.frame()
    raise ConfigError(f"Ollama model {model!r} gave only {len(found)} distinct prompts{length.describe()} in {limit} "
                      f"requests (asked for {count}): raise --temperature, pass more varied --prompts"
                      f"{', widen --min-words/--max-words' if length.describe() else ''} or lower --count")
