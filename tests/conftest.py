"""Shared fixtures. Tests never reach the Hugging Face hub: offline mode is set before any import."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from actors import options as _ray_options  # noqa: E402  (no Ray import: it only sets environment variables)

# Before any test module imports ray: Ray reads this at import time (the cluster binds 127.0.0.1).
_ray_options.embedded_environment()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory ``tiny_model_dir(family, seed=0) -> Path``: a tiny random model folder of that family.

    Built once per session with ``neuronmap.models.tiny.make_tiny`` (families: ``TINY_FAMILIES``) and
    shared by every test: treat the folder as read-only.
    """
    from neuronmap.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple[str, int], object] = {}

    def get(family: str, seed: int = 0):
        key = (family, seed)
        if key not in built:
            built[key] = make_tiny(family, root / f"{family}-seed{seed}", seed=seed)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """Factory ``tiny_model(family, **load_model_kwargs) -> LoadedModel``, a fresh load on CPU each call.

    Fresh so that a test that registers hooks or changes the attention implementation cannot leak
    into another; loading a tiny model takes milliseconds.
    """
    from neuronmap.models.loading import load_model

    def get(family: str, seed: int = 0, **kwargs):
        kwargs.setdefault("device", "cpu")
        return load_model(tiny_model_dir(family, seed), **kwargs)

    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """GCS address (`127.0.0.1:PORT`) of the session's local Ray cluster, started on first use.

    One per session (`ray.init` costs seconds), shared by the Ray tests (tests/actors) and the Serve
    tests (tests/deployments). 4 logical CPUs on any machine, so two workers plus the tokenising
    tasks fit even on a 2-core runner; bound to 127.0.0.1, no dashboard.
    """
    import ray

    with _ray_options.quiet_logs():
        ray.init(**{**_ray_options.embedded_init_kwargs(4), "num_cpus": 4})
    yield ray.get_runtime_context().gcs_address
    with _ray_options.quiet_logs():
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of moto's S3 server on 127.0.0.1 (random port), started on first use, for object-storage tests."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, monkeypatch, tmp_path, request):
    """``(bucket name, boto3 client)``: a fresh bucket, with the environment pointing neuronmap at moto
    (NEURONMAP_S3_ENDPOINT, test credentials) and its staging/cache folders inside tmp_path."""
    import hashlib

    import boto3

    monkeypatch.setenv("NEURONMAP_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NEURONMAP_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("NEURONMAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEURONMAP_KEEP_STAGING", raising=False)
    name = f"runs-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name, client
