#!/usr/bin/env python
"""The store alone: committing per-token shards with ``RunWriter.write_shards`` against a raw write.

What is measured (numbers in benchmarks/BENCHMARKS.md, "Extraction" -> "Per-token capture"):
``--layers`` layers of ``--rows`` x ``--width`` float32 (random, the shape of GPT-2 small's
per-token ``blocks.0-3`` over the shipped prompts by default) committed as ``--shards`` shards, each
``write_shards`` call holding every layer (what ``extract`` does per shard), into a fresh run folder:
RunWriter creation, shard files (HDF5 or Parquet), fsyncs, sha256, renames and manifest rewrites
included. Against ``ndarray.tofile`` + ``fsync`` of the same arrays, one file per layer, in the same
folder tree. The two alternate ``--repeats`` times (the disk's speed drifts) and medians are compared.
The extraction benchmark reports the same ratio inside a whole run (``extraction.py``, per-token part);
this one isolates it and takes seconds, so it is the one to run on a lent machine's disk.

Usage::

    .venv/bin/python benchmarks/store_write.py                       # 4 x 10,483 x 768, 1 shard, hdf5
    .venv/bin/python benchmarks/store_write.py --shards 4 --format parquet
    .venv/bin/python benchmarks/store_write.py --workdir /mnt/nvme/scratch --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_token_manifest(layers: dict[str, tuple[int, ...]], n_samples: int, n_rows: int, format: str):
    from neuronmap.store import Manifest

    return Manifest.new(
        model="benchmark", config_hash="-", tokenizer="-", format=format,
        layers={name: dict(shape=shape, dtype="float32", kind="hidden", per_token=True)
                for name, shape in layers.items()},
        pooling="none", dtype="float32", prompt_source="-", prompt_source_hash="-",
        n_samples=n_samples, n_tokens=n_rows, max_length=128,
    )


def raw_write(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    for i, array in enumerate(arrays.values()):
        sub = folder / f"layer{i}"
        sub.mkdir(parents=True)
        with open(sub / "part.bin", "wb") as fh:
            array.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())


def store_write(folder: Path, arrays: dict[str, np.ndarray], sample_ids: np.ndarray, token_index: np.ndarray,
                shards: int, format: str) -> None:
    from neuronmap.store import RunWriter

    n_rows = len(sample_ids)
    n_samples = int(sample_ids[-1]) + 1
    writer = RunWriter(folder, per_token_manifest({k: v.shape[1:] for k, v in arrays.items()}, n_samples, n_rows,
                                                  format))
    # shard bounds on sample boundaries, as extraction lays them out
    cuts = np.searchsorted(sample_ids, np.linspace(0, n_samples, shards + 1).astype(int)[1:-1])
    bounds = [0, *cuts.tolist(), n_rows]
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        samples = (int(sample_ids[start]), int(sample_ids[end - 1]) + 1)
        writer.write_shards(index, rows=(start, end), samples=samples,
                            arrays={name: array[start:end] for name, array in arrays.items()},
                            sample_ids=sample_ids[start:end], token_index=token_index[start:end])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=10_483, help="token rows per layer")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tokens-per-sample", type=int, default=25)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--format", choices=("hdf5", "parquet"), default="hdf5")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder on the disk to measure")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    arrays = {f"blocks.{i}": rng.standard_normal((args.rows, args.width), dtype=np.float32) for i in range(args.layers)}
    sample_ids = (np.arange(args.rows) // args.tokens_per_sample).astype(np.int64)
    token_index = (np.arange(args.rows) % args.tokens_per_sample).astype(np.int32)
    megabytes = sum(a.nbytes for a in arrays.values()) / 1e6

    scratch = Path(tempfile.mkdtemp(prefix="store-write-", dir=args.workdir))
    times: dict[str, list[float]] = {"raw": [], "store": []}
    try:
        for r in range(args.repeats + 1):  # the first round warms up (imports, page cache, allocator)
            for name in ("raw", "store"):
                folder = scratch / f"{name}-{r}"
                start = time.perf_counter()
                if name == "raw":
                    raw_write(folder, arrays)
                else:
                    store_write(folder, arrays, sample_ids, token_index, args.shards, args.format)
                elapsed = time.perf_counter() - start
                if r:
                    times[name].append(elapsed)
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    result = dict(
        layers=args.layers, rows=args.rows, width=args.width, shards=args.shards, format=args.format,
        megabytes=megabytes, repeats=args.repeats, cpus=os.cpu_count(), load_average=os.getloadavg(),
        times=times, median_s=median, mb_s={name: megabytes / t for name, t in median.items()},
        ratio_store_vs_raw=median["raw"] / median["store"],
    )
    print(f"{megabytes:.1f} MB in {args.shards} shard(s) x {args.layers} layers ({args.format}): "
          f"raw write {median['raw'] * 1e3:.1f} ms ({result['mb_s']['raw']:.0f} MB/s), "
          f"store {median['store'] * 1e3:.1f} ms ({result['mb_s']['store']:.0f} MB/s): "
          f"ratio {result['ratio_store_vs_raw']:.3f} (target >= 0.8); load average {result['load_average'][0]:.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
