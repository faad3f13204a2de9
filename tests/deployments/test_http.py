"""Real HTTP against the Serve app on 127.0.0.1: extraction numbers, runs, analyses, jobs, metrics."""

from __future__ import annotations

import http.client
import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from deployments import encoding

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def reference(serve_runs, serve_model, tmp_path_factory):
    """neuronmap.extract on the same texts: the numbers /v1/extract must return."""
    import neuronmap

    out = tmp_path_factory.mktemp("reference")
    runs = {pooling: neuronmap.extract(serve_model, serve_runs.texts, layers="blocks.*", out=out / pooling,
                                       pooling=pooling) for pooling in ("mean", "none")}
    return {pooling: {layer: run.array(layer) for layer in run.layers} for pooling, run in runs.items()}


def post_extract(app, texts, layers="blocks.*", pooling="mean", accept=None, client=None):
    headers = {"accept": accept} if accept else {}
    body = {"model": app.model, "texts": texts, "layers": layers, "pooling": pooling}
    return (client or httpx).post(f"{app.url}/v1/extract", json=body, headers=headers, timeout=60)


def test_extract_json_equals_neuronmap_extract(open_app, serve_runs, reference):
    response = post_extract(open_app, serve_runs.texts)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_texts"] == len(serve_runs.texts) and body["pooling"] == "mean"
    assert list(body["layers"]) == list(reference["mean"])
    for layer, expected in reference["mean"].items():
        got = np.asarray(body["layers"][layer]["data"], dtype=np.float32)
        assert body["layers"][layer]["shape"] == list(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_extract_per_token_rows_equal_neuronmap_extract(open_app, serve_runs, reference):
    body = post_extract(open_app, serve_runs.texts, pooling="none").json()
    expected = reference["none"]["blocks.1"]
    got = np.asarray(body["layers"]["blocks.1"]["data"], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(body["text_index"]) == len(expected) == sum(body["n_tokens"])
    assert body["token_index"][: body["n_tokens"][0]] == list(range(body["n_tokens"][0]))


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(open_app, serve_runs, reference):
    texts = serve_runs.texts
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post_extract(open_app, [texts[i]], "blocks.2", client=client),
                                  range(len(texts))))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        got = np.asarray(response.json()["layers"]["blocks.2"]["data"], dtype=np.float32)
        np.testing.assert_allclose(got, reference["mean"]["blocks.2"][i : i + 1], rtol=1e-5, atol=1e-6)
    metrics = httpx.get(f"{open_app.url}/metrics").text
    assert "neuronmap_serve_batch_requests_bucket" in metrics and "neuronmap_serve_request_duration_seconds" in metrics


def test_arrow_npy_and_npz_decode_to_the_same_numbers(open_app, serve_runs, reference):
    texts = serve_runs.texts
    arrow = post_extract(open_app, texts, accept=encoding.ARROW)
    assert arrow.status_code == 200 and arrow.headers["content-type"] == encoding.ARROW
    arrays, meta = encoding.decode_arrow(arrow.content)
    for layer, expected in reference["mean"].items():
        np.testing.assert_allclose(arrays[layer], expected, rtol=1e-5, atol=1e-6)
    assert list(meta["text_index"]) == list(range(len(texts)))

    npy = post_extract(open_app, texts, layers="blocks.1", accept=encoding.NPY)
    assert npy.status_code == 200 and npy.headers["x-neuronmap-layer"] == "blocks.1"
    np.testing.assert_allclose(np.load(io.BytesIO(npy.content)), reference["mean"]["blocks.1"], rtol=1e-5, atol=1e-6)

    npz = post_extract(open_app, texts, accept=f"{encoding.NPZ}, application/json;q=0.5")
    with np.load(io.BytesIO(npz.content)) as data:
        assert sorted(data.files) == sorted(reference["mean"])
        np.testing.assert_allclose(data["blocks.0"], reference["mean"]["blocks.0"], rtol=1e-5, atol=1e-6)
    zipfile.ZipFile(io.BytesIO(npz.content)).testzip()

    many = post_extract(open_app, texts, accept=encoding.NPY)
    assert many.status_code == 406 and "one layer" in many.json()["message"]
    assert post_extract(open_app, texts, accept="text/html").status_code == 406


@pytest.mark.parametrize("body, status, words", [
    ({"texts": ["hi"], "layers": "blocks.9"}, 400, "unknown layer"),
    ({"texts": ["hi"], "layers": "blocks.0-99999999"}, 400, "more than"),
    ({"texts": ["hi"], "layers": "blocks.[z-a]"}, 400, "invalid layer spec"),
    ({"texts": [], "layers": "blocks.0"}, 422, "texts"),
    ({"texts": ["x" * 2001]}, 422, "texts"),
    ({"texts": ["hi"] * 65}, 422, "texts"),
    ({"texts": ["hi"], "pooling": "median"}, 422, "pooling"),
    ({"texts": ["hi"], "surprise": 1}, 422, "surprise"),
])
def test_bad_extract_requests_are_4xx_json(open_app, body, status, words):
    response = httpx.post(f"{open_app.url}/v1/extract", json={"model": open_app.model, **body}, timeout=60)
    assert response.status_code == status, response.text
    assert words in response.json()["message"]


def test_unknown_model_and_broken_json_are_4xx(open_app):
    response = httpx.post(f"{open_app.url}/v1/extract", json={"model": "gpt-99", "texts": ["hi"]})
    assert response.status_code == 422 and "model" in response.json()["message"]
    broken = httpx.post(f"{open_app.url}/v1/extract", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"] == "validation_error"
    assert broken.json()["message"].startswith("the request body is not valid JSON at character 1 (")
    latin1 = httpx.post(f"{open_app.url}/v1/extract", content='{"texts": ["caf\u00e9"]}'.encode("latin-1"),
                        headers={"content-type": "application/json"})
    assert latin1.status_code == 400 and latin1.json()["error"] == "bad_request", latin1.text
    assert "UTF-8" in latin1.json()["message"] and "parsing the body" not in latin1.json()["message"]


def test_runs_endpoints_return_what_is_on_disk(open_app, serve_runs):
    import neuronmap

    run = neuronmap.open_run(serve_runs.runs / "demo")
    listed = httpx.get(f"{open_app.url}/v1/runs").json()
    assert [r["id"] for r in listed] == ["demo"]  # the symlink out of the runs directory is not listed
    detail = httpx.get(f"{open_app.url}/v1/runs/demo").json()
    assert detail["model"] == run.manifest.model and detail["n_samples"] == len(serve_runs.texts)
    assert detail["n_shards"] == len(run.manifest.shards) and detail["prompt_columns"] == ["sample_id", "text", "topic"]
    assert {name: info["shape"] for name, info in detail["layer_info"].items()} == \
        {name: list(run.shape(name)) for name in run.layers}
    assert detail["analyses"] == [serve_runs.artifact.id]

    stats = httpx.get(f"{open_app.url}/v1/runs/demo/layers/blocks.1/stats").json()
    x = run.array("blocks.1").astype(np.float64)
    assert stats["n_rows"] == len(x) and stats["n_features"] == x.shape[1]
    np.testing.assert_allclose(stats["per_neuron"]["mean"], x.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["per_neuron"]["std"], x.std(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["per_neuron"]["max"], x.max(axis=0))
    assert stats["summary"]["min"] == pytest.approx(x.min())
    assert httpx.get(f"{open_app.url}/v1/runs/demo/layers/blocks.7/stats").status_code == 404


def test_analyses_endpoints_return_what_is_on_disk(open_app, serve_runs):
    artifact = serve_runs.artifact
    listed = httpx.get(f"{open_app.url}/v1/runs/demo/analyses").json()
    assert [a["id"] for a in listed] == [artifact.id]  # stats-escape links out of the run: not listed
    detail = httpx.get(f"{open_app.url}/v1/analyses/demo/{artifact.id}").json()
    on_disk = json.loads((artifact.path / "result.json").read_text())
    assert detail["result"] == on_disk
    assert detail["arrays"] == sorted(artifact.arrays) and detail["tables"] == artifact.tables
    figure = detail["figure"]
    assert figure["data"][0]["type"] == "bar" and figure["data"][0]["x"] == artifact.units
    assert httpx.get(f"{open_app.url}/v1/analyses/demo/{artifact.id}?figure=false").json()["figure"] is None


def test_post_analysis_runs_a_job_to_an_artifact_on_disk(open_app, serve_runs):
    from neuronmap.analysis import load_artifact

    started = httpx.post(f"{open_app.url}/v1/runs/demo/analyses",
                         json={"analysis": "pca", "layers": "blocks.0-1", "params": {"n_components": 3}})
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    deadline = time.monotonic() + 60
    while True:
        job = httpx.get(f"{open_app.url}/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["tasks_done"] == job["tasks_total"] == 2
    artifact = load_artifact(serve_runs.runs / "demo" / "analyses" / job["artifact_id"])
    assert artifact.analysis == "pca" and artifact.units == ["blocks.0", "blocks.1"]
    detail = httpx.get(f"{open_app.url}/v1/analyses/demo/{job['artifact_id']}").json()
    assert detail["result"]["units"]["blocks.0"]["metrics"] == artifact.metrics("blocks.0")


@pytest.mark.parametrize("body, words", [
    ({"analysis": "no-such"}, "unknown analysis"),
    ({"analysis": "pca", "params": {"n_components": -1}}, "n_components"),
    ({"analysis": "pca", "layers": "blocks.9"}, "blocks.9"),
    ({"analysis": "kmeans", "labels": "colour"}, "colour"),
    # refused at once, as `analyze` would refuse them before computing (they were failed jobs)
    ({"analysis": "pca", "layers": []}, "selects no layer"),
    ({"analysis": "cka", "layers": "blocks.0"}, "select at least 2"),
    ({"analysis": "pca", "params": {"n_components": 100}}, "n_components=100 must be between 1 and"),
    ({"analysis": "tsne", "params": {"perplexity": 30}}, "perplexity=30 must be less than n_samples=8"),
])
def test_bad_analysis_requests_are_400(open_app, body, words):
    response = httpx.post(f"{open_app.url}/v1/runs/demo/analyses", json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]
    assert httpx.get(f"{open_app.url}/v1/jobs/{'0123456789abcdef' * 2}").status_code == 404
    assert httpx.get(f"{open_app.url}/v1/jobs/0123456789abcdef").status_code == 400  # not a job id


def raw_get(base: str, path: str) -> tuple[int, dict]:
    """GET with the path sent exactly as written (httpx would normalise '..' away)."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("path, statuses", [
    ("/v1/runs/..", {400}),
    ("/v1/runs/../runs/demo", {404}),
    ("/v1/runs/%2Fetc%2Fpasswd", {404}),
    ("/v1/runs/..%2F..%2Fetc", {404}),
    ("/v1/runs/.hidden", {400}),
    ("/v1/runs/escape", {404}),
    ("/v1/runs/escape/analyses", {404}),
    ("/v1/runs/escape/layers/blocks.0/stats", {404}),
    ("/v1/analyses/demo/..", {400}),
    ("/v1/analyses/demo/stats-escape", {404}),
    ("/v1/analyses/escape/stats-escape", {404}),
])
def test_ids_cannot_escape_the_runs_directory(open_app, path, statuses):
    status, body = raw_get(open_app.url, path)
    assert status in statuses, (path, status, body)
    assert "error" in body


def test_healthz_metrics_openapi_and_audit_log(open_app):
    health = httpx.get(f"{open_app.url}/healthz").json()
    assert health["status"] == "ok" and health["models"] == [open_app.model] and health["auth"] is False
    schema = httpx.get(f"{open_app.url}/openapi.json").json()
    assert {"/v1/extract", "/v1/runs", "/v1/jobs/{job_id}", "/metrics"} <= set(schema["paths"])
    metrics = httpx.get(f"{open_app.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'neuronmap_serve_requests_total{method="GET",route="/healthz",status="200"}' in metrics.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = open_app.audit.read_text().splitlines() if open_app.audit.exists() else []
        if any("route=/metrics" in line for line in lines):
            break
        time.sleep(0.2)
    healthz = [line for line in lines if "route=/healthz" in line]
    assert healthz and "key=anonymous" in healthz[-1] and "status=200" in healthz[-1] and "latency_ms=" in healthz[-1]
