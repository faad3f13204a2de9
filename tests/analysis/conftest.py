"""Analysis tests run their BLAS/OpenMP pools single-threaded: the data are small, and on a busy
2-core machine OpenMP's spin-waiting makes scikit-learn's k-means 10x slower with two threads."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_pools():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield
