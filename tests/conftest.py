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
