"""Helpers shared by the store tests: build a small run with known random arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from neuronmap.store import Manifest, RunWriter

LAYERS = {"blocks.0": [6], "blocks.1.attn.pattern": [2, 3, 4], "module:transformer.h/0": [5]}


@dataclass
class Written:
    """What a test wrote, to compare against what is read back."""

    path: Path
    per_token: bool
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    sample_ids: np.ndarray | None = None
    token_index: np.ndarray | None = None
    shard_rows: list[tuple[int, int]] = field(default_factory=list)
    prompts: pd.DataFrame | None = None


def make_manifest(layers=LAYERS, dtype="float32", per_token=False, n_samples=7, n_tokens=None, **extra):
    return Manifest.new(
        model="tiny-gpt2", config_hash="abc123", tokenizer="tiny-gpt2",
        layers={name: dict(shape=shape, dtype=dtype, kind="pattern" if "pattern" in name else "hidden",
                           per_token=per_token) for name, shape in layers.items()},
        pooling="none" if per_token else "mean", dtype=dtype, prompt_source="prompts.txt",
        prompt_source_hash="p0", n_samples=n_samples, n_tokens=n_tokens, max_length=16, **extra,
    )


def plan(per_token: bool, n_samples: int = 7, samples_per_shard: int = 3, seed: int = 0):
    """Rows per sample and per-shard (rows, samples) ranges, like extraction lays them out."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, size=n_samples) if per_token else np.ones(n_samples, dtype=int)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    shards = []
    for s0 in range(0, n_samples, samples_per_shard):
        s1 = min(n_samples, s0 + samples_per_shard)
        shards.append(((int(offsets[s0]), int(offsets[s1])), (s0, s1)))
    return lengths, int(offsets[-1]), shards


def write_run(path, format="hdf5", per_token=False, dtype="float32", layers=LAYERS, n_samples=7,
              compression=None, complete=True, seed=0, n_shards_to_write=None) -> Written:
    """Write a run with random arrays; returns everything written."""
    rng = np.random.default_rng(seed)
    lengths, n_rows, shards = plan(per_token, n_samples, seed=seed)
    manifest = make_manifest(layers, dtype, per_token, n_samples, n_rows if per_token else None)
    sample_ids = np.arange(100, 100 + n_samples, dtype=np.int64)
    row_ids = np.repeat(sample_ids, lengths)
    token_index = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]) if per_token else None
    written = Written(Path(path), per_token, sample_ids=row_ids, token_index=token_index,
                      shard_rows=[rows for rows, _ in shards])
    written.prompts = pd.DataFrame({"sample_id": sample_ids, "text": [f"prompt {i} é" for i in range(n_samples)],
                                    "label": rng.integers(0, 2, n_samples)})
    writer = RunWriter(path, manifest, format=format, compression=compression)
    writer.write_prompts(written.prompts)
    for name, shape in layers.items():
        written.arrays[name] = (rng.standard_normal((n_rows, *shape)) * 10).astype(dtype)
    for index, (rows, samples) in enumerate(shards[:n_shards_to_write]):
        for name in layers:
            writer.write_shard(name, index, rows=rows, samples=samples,
                               activations=written.arrays[name][rows[0] : rows[1]],
                               sample_ids=row_ids[rows[0] : rows[1]],
                               token_index=None if token_index is None else token_index[rows[0] : rows[1]])
    if complete:
        writer.complete()
    return written


def listing(path: Path) -> list[str]:
    """Every file under `path`, relative, sorted (the lock files excluded)."""
    return sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*")
                  if p.is_file() and p.name not in (".lock", ".writing"))
