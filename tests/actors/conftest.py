"""Fixtures of the Ray tests. The session's local Ray cluster (`ray_cluster`) lives in tests/conftest.py,
so the Ray and the Serve tests (tests/deployments) share one `ray.init` per session.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_dir):
    return str(tiny_model_dir("gpt2"))


@pytest.fixture()
def one_thread():
    """torch on one thread in this process, like a worker with one CPU (restored afterwards).

    CPU float32 results depend on the thread count at rounding level (oneDNN splits reductions
    differently), so a bit-exact comparison needs the local reference run on as many threads as a
    worker: `--cpus-per-worker 1` means one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
