"""Helpers for the analysis tests: synthetic runs written with the real RunWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neuronmap.store import Manifest, RunWriter


def write_synthetic_run(path, layers: dict[str, np.ndarray], labels: dict[str, list] | None = None,
                        samples_per_shard: int = 100, complete: bool = True, n_shards: int | None = None,
                        format: str = "hdf5", prompt_source_hash: str = "s0") -> Path:
    """A per-sample run whose layer `name` holds `layers[name]` (n_samples, *shape), cut into shards.

    `labels` become prompts.parquet columns. With complete=False only the first `n_shards` shards are
    committed and the run stays `running`.
    """
    n = len(next(iter(layers.values())))
    manifest = Manifest.new(
        model="synthetic", config_hash="s0", tokenizer="none",
        layers={name: dict(shape=list(a.shape[1:]), dtype=str(a.dtype), kind="hidden", per_token=False)
                for name, a in layers.items()},
        pooling="mean", dtype=str(next(iter(layers.values())).dtype), prompt_source="synthetic",
        prompt_source_hash=prompt_source_hash, n_samples=n)
    writer = RunWriter(path, manifest, format=format)
    writer.write_prompts(pd.DataFrame({"text": [f"prompt {i}" for i in range(n)], **(labels or {})}))
    starts = list(range(0, n, samples_per_shard))
    for index, start in enumerate(starts[:n_shards]):
        end = min(n, start + samples_per_shard)
        for name, array in layers.items():
            writer.write_shard(name, index, rows=(start, end), samples=(start, end), activations=array[start:end],
                               sample_ids=np.arange(start, end, dtype=np.int64))
    if complete:
        writer.complete()
    return Path(path)


def read_layer_h5(run, layer: str) -> np.ndarray:
    """A layer's activations (n_rows, n_features) read with plain h5py from its shard files, in file order:
    an independent path to the data, which does not go through neuronmap's reader."""
    import h5py

    parts = []
    for path in sorted((Path(run) / "activations" / layer).glob("part-*.h5")):
        with h5py.File(path, "r") as handle:
            parts.append(handle["activations"][...])
    x = np.concatenate(parts)
    return x.reshape(len(x), -1)


def blobs(n: int = 300, n_features: int = 16, centers: int = 3, seed: int = 0, std: float = 1.0):
    """Planted Gaussian blobs: (x float32 (n, n_features), y int (n,))."""
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n, n_features=n_features, centers=centers, random_state=seed, cluster_std=std)
    return x.astype(np.float32), y


def embedded_subspace(n: int, dim: int, ambient: int = 100, seed: int = 0) -> np.ndarray:
    """n Gaussian points of a random `dim`-dimensional linear subspace of R^ambient."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((ambient, dim)))
    return rng.standard_normal((n, dim)) @ basis.T


def write_per_token_run(path, lengths: list[int], n_features: int = 4, seed: int = 0,
                        labels: dict[str, list] | None = None) -> tuple[Path, np.ndarray]:
    """A per-token run (pooling none) with one layer "blocks.0"; returns (path, activations)."""
    rng = np.random.default_rng(seed)
    n_tokens = int(sum(lengths))
    x = rng.standard_normal((n_tokens, n_features)).astype(np.float32)
    manifest = Manifest.new(
        model="synthetic", config_hash="s0", tokenizer="none",
        layers={"blocks.0": dict(shape=[n_features], dtype="float32", kind="hidden", per_token=True)},
        pooling="none", dtype="float32", prompt_source="synthetic", prompt_source_hash="s0",
        n_samples=len(lengths), n_tokens=n_tokens)
    writer = RunWriter(path, manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"p{i}" for i in range(len(lengths))], **(labels or {})}))
    sample_ids = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    token_index = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    writer.write_shard("blocks.0", 0, rows=(0, n_tokens), samples=(0, len(lengths)), activations=x,
                       sample_ids=sample_ids, token_index=token_index)
    writer.complete()
    return Path(path), x
