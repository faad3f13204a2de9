"""Real HTTP against the guarded app: API keys, 429 with Retry-After, 413 (declared and chunked bodies)."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.timeout(240)


def test_open_app_needs_no_key(open_app):
    assert httpx.get(f"{open_app.url}/v1/runs").status_code == 200


def test_keys_are_required_on_the_guarded_app(guarded_app):
    url, keys = guarded_app.url, guarded_app.keys
    missing = httpx.get(f"{url}/v1/runs")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == "unauthorized"
    assert httpx.get(f"{url}/v1/runs", headers={"authorization": "Bearer wrong"}).status_code == 401
    bearer = httpx.get(f"{url}/v1/runs", headers={"authorization": f"Bearer {keys['alice']}"})
    assert bearer.status_code == 200 and [r["id"] for r in bearer.json()] == ["demo"]
    assert httpx.get(f"{url}/v1/runs/demo", headers={"x-api-key": keys["alice"]}).status_code == 200
    # open routes: liveness and the schema (which declares the key schemes)
    assert httpx.get(f"{url}/healthz").json()["auth"] is True
    schema = httpx.get(f"{url}/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}


def test_rate_limit_answers_429_with_retry_after(guarded_app):
    headers = {"x-api-key": guarded_app.keys["bob"]}
    statuses = []
    with httpx.Client(headers=headers) as client:
        for _ in range(30):
            response = client.get(f"{guarded_app.url}/healthz")  # never limited
            assert response.status_code == 200
            response = client.get(f"{guarded_app.url}/v1/runs")
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
    assert statuses[:5] == [200] * 5  # the burst
    assert statuses[-1] == 429, statuses
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"] == "rate_limited" and "bob" in response.json()["message"]
    # another key has its own bucket
    other = httpx.get(f"{guarded_app.url}/v1/runs", headers={"x-api-key": guarded_app.keys["carol"]})
    assert other.status_code == 200


def test_request_size_limit_answers_413(guarded_app):
    url, key = guarded_app.url, guarded_app.keys["alice"]
    big = {"model": "m", "texts": ["x" * 1000] * 8}
    declared = httpx.post(f"{url}/v1/extract", json=big)  # Content-Length over 4 KiB: refused before auth
    assert declared.status_code == 413 and declared.json()["error"] == "payload_too_large"

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    chunked = httpx.post(f"{url}/v1/extract", content=chunks(), headers={"x-api-key": key,
                                                                         "content-type": "application/json"})
    assert chunked.status_code == 413
    small = httpx.post(f"{url}/v1/extract", json={"model": "m", "texts": ["hi"]}, headers={"x-api-key": key})
    assert small.status_code == 400 and "not served" in small.json()["message"]
