"""The plain classes behind the Serve app, without Ray: settings and keys, the guard's parts,
encodings, path checks, the extraction service, jobs, and the FastAPI app in-process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import httpx
import numpy as np
import pytest

from deployments import encoding
from deployments.catalog import check_id, inside
from deployments.extractor import ExtractionService, check_layer_spec
from deployments.guard import ApiKeys, RateLimiter, presented_key
from deployments.schemas import ApiError, ExtractOutcome
from deployments.settings import ServeSettings, is_loopback, key_digest, parse_keys, read_key_file
from neuronmap.errors import ConfigError


# -- settings and keys -------------------------------------------------------------------------------
def test_keys_from_env_and_file_become_digests(tmp_path):
    (tmp_path / "keys.yaml").write_text("carol: c-key\n")
    settings = ServeSettings(api_keys_file=str(tmp_path / "keys.yaml")).resolved(
        {"NEURONMAP_API_KEYS": "alice:a-key, b-key"})
    hashes = settings.api_key_hashes
    assert hashes["alice"] == key_digest("a-key") and hashes["carol"] == key_digest("c-key")
    assert hashes[f"key-{key_digest('b-key')[:8]}"] == key_digest("b-key")
    assert "a-key" not in str(settings.model_dump()) and settings.auth_enabled


def test_auth_defaults_follow_the_host():
    assert not ServeSettings().resolved({}).auth_enabled  # loopback, no keys: open
    with pytest.raises(ConfigError, match="without API keys"):
        ServeSettings(host="0.0.0.0").resolved({})
    assert not ServeSettings(host="0.0.0.0", auth="off").resolved({"NEURONMAP_API_KEYS": "a:b"}).auth_enabled
    with pytest.raises(ConfigError, match="no API keys"):
        ServeSettings(auth="on").resolved({})
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.5")


def test_served_model_names():
    settings = ServeSettings(models=["tiny=models/tiny-gpt2", "gpt2", " minilm = all-minilm-l6-v2 "])
    assert settings.served_models() == {"tiny": "models/tiny-gpt2", "gpt2": "gpt2", "minilm": "all-minilm-l6-v2"}
    with pytest.raises(ConfigError, match="twice"):
        ServeSettings(models=["a=x", "a=y"]).resolved({})
    with pytest.raises(ConfigError, match="NAME=SOURCE"):
        ServeSettings(models=["=x"]).served_models()


def test_bad_key_sources_and_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="id:key"):
        parse_keys("alice:")
    (tmp_path / "k.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="map key ids"):
        read_key_file(tmp_path / "k.json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_key_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ConfigError, match="holds no keys"):  # would have served without auth, without a word
        read_key_file(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="limits.max_texts"):
        ServeSettings.parse({"limits": {"max_texts": 0}})


def test_api_keys_identify_by_digest_and_header():
    keys = ApiKeys({"alice": key_digest("s3cret")})
    assert keys.identify("s3cret") == "alice" and keys.identify("nope") is None and keys.identify(None) is None
    assert presented_key({"authorization": "Bearer s3cret"}) == "s3cret"
    assert presented_key({"x-api-key": " s3cret "}) == "s3cret"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert not ApiKeys({}).enabled


def test_rate_limiter_token_bucket_with_fake_clock():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)  # one token a second
    assert limiter.acquire("b") == 0.0  # per key
    now[0] = 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.acquire("a") == 0.0
    assert RateLimiter(0).acquire("a") == 0.0 and not RateLimiter(0).enabled


# -- encodings and ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("accept, media", [
    (None, encoding.JSON), ("*/*", encoding.JSON), ("application/x-npy", encoding.NPY),
    ("application/json;q=0.5, application/vnd.apache.arrow.stream", encoding.ARROW),
    ("text/html, application/x-npz;q=0.1", encoding.NPZ),
])
def test_accept_negotiation(accept, media):
    assert encoding.negotiate(accept) == media


def test_unacceptable_accept_is_406():
    with pytest.raises(ApiError) as caught:
        encoding.negotiate("text/html, application/json;q=0")
    assert caught.value.status == 406


def test_arrow_round_trip_per_token():
    arrays = {"blocks.0": np.arange(5 * 3, dtype=np.float32).reshape(5, 3),
              "blocks.0.attn.pattern": np.ones((5, 2, 3), np.float16)}
    outcome = ExtractOutcome(arrays=arrays, lengths=np.array([2, 3]))
    decoded, meta = encoding.decode_arrow(encoding.encode_arrow("m", "none", "float32", outcome))
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == array.dtype
    assert meta["text_index"].tolist() == [0, 0, 1, 1, 1] and meta["token_index"].tolist() == [0, 1, 0, 1, 2]


def test_json_numbers_read_back_to_the_same_floats():
    """Shortest float32/float16 text per value: parsed by the stdlib and cast back, the arrays are equal."""
    import json

    rng = np.random.default_rng(0)
    arrays = {"blocks.0": rng.standard_normal((5, 7)).astype(np.float32) * 1e3,
              "blocks.1": rng.standard_normal((5, 2, 3)).astype(np.float16)}
    arrays["blocks.0"][0, 0] = np.float32(1e-38)
    arrays["blocks.0"][1, 1] = np.nan  # non-finite values are null
    outcome = ExtractOutcome(arrays=arrays, lengths=np.array([2, 3]), n_truncated=1)
    body = json.loads(encoding.encode_json("m", "none", "float32", outcome))
    assert body["n_tokens"] == [2, 3] and body["n_truncated"] == 1 and body["n_texts"] == 2
    assert body["text_index"] == [0, 0, 1, 1, 1] and body["token_index"] == [0, 1, 0, 1, 2]
    for name, array in arrays.items():
        layer = body["layers"][name]
        assert layer["shape"] == list(array.shape) and layer["dtype"] == str(array.dtype)
        back = np.array(layer["data"], dtype=np.float64)  # null -> nan
        np.testing.assert_array_equal(back.astype(array.dtype), array)
    pooled = json.loads(encoding.encode_json("m", "mean", "float32", ExtractOutcome(
        arrays={"final": np.ones((2, 4), np.float32)[:, ::2]}, lengths=np.array([3, 1]))))  # a strided view
    assert pooled["text_index"] is None and pooled["layers"]["final"]["data"] == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("bad", ["..", ".", ".hidden", "a/b", "/etc", "a..b", "", "x" * 201, "a\x00b"])
def test_check_id_refuses_anything_but_a_plain_name(bad):
    with pytest.raises(ApiError) as caught:
        check_id(bad, "run")
    assert caught.value.status == 400


def test_inside_follows_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "out").symlink_to(tmp_path / "elsewhere")
    (root / "alias").symlink_to(root / "run")
    real = root.resolve()
    assert inside(root / "run", real) == (root / "run").resolve()
    assert inside(root / "alias", real) == (root / "run").resolve()
    assert inside(root / "out", real) is None and inside(root, real) is None


def test_an_analysis_job_is_refused_when_a_shard_lies_outside_its_run(serve_runs, tmp_path):
    """`/stats` refused a run whose shard resolves outside its folder; a job on it read the file. Both
    refuse now (409), a shard listed through '..' makes the manifest itself unreadable, and a sound copy
    of the same run is accepted."""
    import json
    import shutil

    from deployments.analysis_jobs import validate_analysis
    from deployments.catalog import RunsCatalog

    runs = tmp_path / "runs"
    for name in ("sound", "linked", "dotted"):
        shutil.copytree(serve_runs.runs / "demo", runs / name, symlinks=True)
    outside = shutil.copytree(serve_runs.runs / "demo", tmp_path / "outside")
    shard = json.loads((runs / "linked" / "manifest.json").read_text())["shards"][0]["path"]
    (runs / "linked" / shard).unlink()
    (runs / "linked" / shard).symlink_to(outside / shard)
    manifest = json.loads((runs / "dotted" / "manifest.json").read_text())
    manifest["shards"][0]["path"] = f"../../outside/{shard}"
    (runs / "dotted" / "manifest.json").write_text(json.dumps(manifest))

    catalog, request = RunsCatalog(runs), {"analysis": "stats", "layers": "blocks.0"}
    assert validate_analysis(catalog, "sound", request) == str((runs / "sound").resolve())
    with pytest.raises(ApiError) as linked:
        validate_analysis(catalog, "linked", request)
    assert linked.value.status == 409 and "outside its folder" in linked.value.message
    with pytest.raises(ApiError) as dotted:
        validate_analysis(catalog, "dotted", request)
    assert dotted.value.status == 409 and "must be relative and inside the run folder" in dotted.value.message


def test_layer_ranges_are_bounded_before_expansion():
    assert check_layer_spec("blocks.0-3, final") == ["blocks.0-3", "final"]
    with pytest.raises(ConfigError, match="more than"):
        check_layer_spec("blocks.0-5000")
    with pytest.raises(ConfigError, match="more than"):
        check_layer_spec("blocks.0-100.0-100")


# -- extraction service ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_model_dir):
    return ExtractionService.load(str(tiny_model_dir("gpt2")), device="cpu")


def test_merged_batch_equals_separate_extractions(service, tiny_model_dir, tmp_path):
    import neuronmap

    texts = ["short", "a somewhat longer text here", "mid length text"]
    layers = "blocks.0,blocks.1.attn.pattern"
    reference = neuronmap.extract(str(tiny_model_dir("gpt2")), texts, layers=layers, out=tmp_path / "r", pooling="last")
    jobs = [service.prepare(texts[:1], layers, "last"), service.prepare(texts[1:], layers, "last"),
            service.prepare(texts, "blocks.2", "mean")]
    outcomes = service.run(jobs)
    assert [o.batch_requests for o in outcomes] == [3, 3, 3]
    assert [o.first_in_batch for o in outcomes] == [True, False, False]
    got = np.concatenate([outcomes[0].arrays["blocks.0"], outcomes[1].arrays["blocks.0"]])
    np.testing.assert_allclose(got, reference.array("blocks.0"), rtol=1e-5, atol=1e-6)
    pattern = reference.array("blocks.1.attn.pattern")  # padded to the longest of all three texts
    second = outcomes[1].arrays["blocks.1.attn.pattern"]  # padded to the longest of its own two
    np.testing.assert_allclose(second, pattern[1:, ..., : second.shape[-1]], rtol=1e-5, atol=1e-6)
    assert not pattern[1:, ..., second.shape[-1]:].any()
    assert outcomes[2].arrays["blocks.2"].shape == (3, 64)


def test_a_batch_of_calls_answers_each_in_order_and_refuses_only_the_bad_one(service, tiny_model_dir, tmp_path):
    """`answer` (one model call per ingress batch): bad requests get their 400, the rest share the forward."""
    import neuronmap
    from deployments.schemas import ExtractCall

    texts = ["The cat sat on the mat.", "Dogs bark.", "Why is the sky blue?"]
    reference = neuronmap.extract(str(tiny_model_dir("gpt2")), texts, layers="blocks.1", out=tmp_path / "r",
                                  pooling="mean")
    calls = [ExtractCall([texts[0]], "blocks.1", "mean", "float32"), ExtractCall(["x"], "blocks.9", "mean", "float32"),
             ExtractCall(texts[1:], "blocks.1", "mean", "float32")]
    first, bad, rest = service.answer(calls)
    assert bad.error_status == 400 and "unknown layer" in bad.error_message and "\n" not in bad.error_message
    assert first.error_status is None and first.batch_requests == rest.batch_requests == 2
    got = np.concatenate([first.arrays["blocks.1"], rest.arrays["blocks.1"]])
    np.testing.assert_allclose(got, reference.array("blocks.1"), rtol=1e-5, atol=1e-6)


def test_ingress_keeps_two_model_calls_in_flight_per_model_replica():
    from deployments import options

    assert options.concurrent_batches(ServeSettings()) == 2
    assert options.concurrent_batches(ServeSettings(model_replicas=3)) == 6
    assert options.concurrent_batches(ServeSettings(model_autoscaling={"min_replicas": 1, "max_replicas": 4})) == 8
    assert options.concurrent_batches(ServeSettings(batching={"max_concurrent_batches": 5}, model_replicas=3)) == 5
    wide = ServeSettings(batching={"max_batch_size": 1024})
    assert options.ingress_options(wide)["max_ongoing_requests"] >= 1024 * 2  # serve.batch can fill its batches


@pytest.mark.parametrize("layers, words", [
    ("blocks.9", "unknown layer"), ("module:wte.nope", "unknown module"), ("blocks.[z-a]", "invalid layer spec"),
    ("", "empty layer spec"), ("blocks.0-99999", "more than"),
])
def test_layer_mistakes_are_400_outcomes(service, layers, words):
    outcome = service.extract(["hi"], layers)
    assert outcome.error_status == 400 and words in outcome.error_message


def test_output_size_limit(tiny_model_dir):
    from deployments.settings import Limits

    small = ExtractionService.load(str(tiny_model_dir("gpt2")), device="cpu", limits=Limits(max_output_values=100))
    outcome = small.extract(["hello there"] * 4, "blocks.*", "none")
    assert outcome.error_status == 400 and "limit 100" in outcome.error_message


# -- jobs and the FastAPI app in-process ---------------------------------------------------------------
def test_job_manager_reports_progress_and_failure(serve_runs):
    from deployments.analysis_jobs import JobManager

    manager = JobManager()
    run = str(serve_runs.runs / "demo")
    ok = manager.submit(run, "demo", {"analysis": "stats", "layers": "blocks.0-1", "params": {}})
    bad = manager.submit(run, "demo", {"analysis": "pca", "layers": "blocks.0", "params": {"n_components": 999}})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(manager.get(j["id"])["state"] in ("queued", "running")
                                              for j in (ok, bad)):
        time.sleep(0.05)
    done, failed = manager.get(ok["id"]), manager.get(bad["id"])
    # stats runs one task per shard: 2 layers x 3 shards (8 prompts, 3 per shard)
    assert done["state"] == "succeeded" and done["progress"] == 1.0 and done["tasks_done"] == done["tasks_total"] == 6
    assert failed["state"] == "failed" and "n_components=999" in failed["error"]
    assert manager.get("missing") is None
    manager.shutdown()


def test_in_process_app_guards_and_audits(service, serve_runs, caplog):
    from deployments.analysis_jobs import JobManager
    from deployments.api import LocalExtractor, LocalJobs, NeuronMapAPI
    from deployments.http import create_app

    settings = ServeSettings(runs_dir=str(serve_runs.runs), models=["tiny"], rate_limit_per_minute=60,
                             rate_limit_burst=2).resolved({"NEURONMAP_API_KEYS": "dana:d-key"})
    app = create_app(NeuronMapAPI(settings, {"tiny": LocalExtractor(service)}, LocalJobs(JobManager())))

    async def calls():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            key = {"x-api-key": "d-key"}
            ok = await client.post("/v1/extract", json={"model": "tiny", "texts": ["hi"], "layers": "blocks.0"},
                                   headers=key)
            denied = await client.get("/v1/runs")
            second = await client.get("/v1/runs", headers=key)
            limited = await client.get("/v1/runs", headers=key)
            return ok, denied, second, limited

    with caplog.at_level(logging.INFO, logger="neuronmap.serve.audit"):
        # A fresh thread owns its own event loop: another test (e.g. a browser driver) may have left
        # one running in this thread, where asyncio.run would refuse.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            ok, denied, second, limited = pool.submit(asyncio.run, calls()).result()
    assert ok.status_code == 200 and ok.json()["layers"]["blocks.0"]["shape"] == [1, 64]
    assert denied.status_code == 401 and second.status_code == 200
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "neuronmap.serve.audit"]
    assert len(lines) == 4
    assert lines[0].startswith("key=dana method=POST route=/v1/extract status=200 latency_ms=")
    assert lines[1].startswith("key=- method=GET route=/v1/runs status=401")
    assert "status=429" in lines[3]


def test_blank_texts_are_refused_in_one_clear_line():
    """A whitespace-only text is refused by the schema (as a blank prompt line is by the CLI), and the
    422 message says so instead of quoting a regex; texts with a visible character pass."""
    import pydantic

    from deployments.http import _validation_message
    from deployments.schemas import extract_request_model
    from deployments.settings import Limits

    model = extract_request_model(Limits(), ["tiny"])
    assert model(model="tiny", texts=[" x ", "a"]).texts == [" x ", "a"]
    with pytest.raises(pydantic.ValidationError) as info:
        model(model="tiny", texts=["ok", " \t\n"])
    as_fastapi = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]  # FastAPI's body prefix
    message, detail = _validation_message(as_fastapi)
    assert message == "invalid request: texts.1: text is empty or only whitespace; send at least one visible character"
    assert detail[0]["loc"] == ["body", "texts", "1"]
