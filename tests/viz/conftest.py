"""A small synthetic run shared by the figure and command tests (written with the real RunWriter)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="session")
def run_path(tmp_path_factory):
    """A 3-layer synthetic run of 60 samples with a `topic` label."""
    from neuronmap.store import Manifest, RunWriter

    path = tmp_path_factory.mktemp("viz") / "run"
    rng = np.random.default_rng(0)
    n, d = 60, 8
    base = rng.standard_normal((n, d)).astype(np.float32)
    layers = {f"blocks.{i}": (base * (i + 1) + rng.standard_normal((n, d)) * 0.1).astype(np.float32) for i in range(3)}
    manifest = Manifest.new(model="synthetic", config_hash="c", tokenizer="none",
                            layers={k: dict(shape=[d], dtype="float32", kind="hidden", per_token=False) for k in layers},
                            pooling="mean", dtype="float32", prompt_source="synthetic", prompt_source_hash="h",
                            n_samples=n)
    writer = RunWriter(path, manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"prompt number {i}" for i in range(n)],
                                       "topic": ["a", "b", "c"] * (n // 3)}))
    for name, array in layers.items():
        writer.write_shard(name, 0, rows=(0, n), samples=(0, n), activations=array,
                           sample_ids=np.arange(n, dtype=np.int64))
    writer.complete()
    return path
