"""Helpers of the concept tests: runs written with the real RunWriter, stamped with a model's identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neuronmap.store import Manifest, RunWriter


def write_run(path, layers: dict[str, np.ndarray], labels: dict[str, list] | None = None, model: str = "synthetic",
              config_hash: str = "s0", tokenizer: str = "none", pooling: str = "mean",
              samples_per_shard: int = 100) -> Path:
    """A complete per-sample run holding `layers[name]` (n_samples, d), cut into shards of `samples_per_shard`."""
    n = len(next(iter(layers.values())))
    manifest = Manifest.new(
        model=model, config_hash=config_hash, tokenizer=tokenizer,
        layers={name: dict(shape=list(a.shape[1:]), dtype=str(a.dtype), kind="hidden", per_token=False)
                for name, a in layers.items()},
        pooling=pooling, dtype=str(next(iter(layers.values())).dtype), prompt_source="synthetic",
        prompt_source_hash="s0", n_samples=n)
    writer = RunWriter(path, manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"prompt {i}" for i in range(n)], **(labels or {})}))
    for index, start in enumerate(range(0, n, samples_per_shard)):
        end = min(n, start + samples_per_shard)
        for name, array in layers.items():
            writer.write_shard(name, index, rows=(start, end), samples=(start, end), activations=array[start:end],
                               sample_ids=np.arange(start, end, dtype=np.int64))
    writer.complete()
    return Path(path)


def no_hooks(model) -> bool:
    """True when no module of `model` holds a forward hook or pre-hook."""
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from neuronmap.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The CLI's error output, asserted to be one line starting with 'error:'."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]
