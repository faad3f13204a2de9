#!/usr/bin/env python
"""Per-token extraction when the forward costs almost nothing: what NeuronMap itself adds.

Why: #2's per-token target (capture >= 0.8 of a raw write) is about a GPU, where the forward is
cheap and the pipeline around it (tokenising, padding, gathering real tokens, shards, fsyncs,
manifest) must keep up with the disk. On a CPU a real forward hides all of that. This benchmark
takes the forward out of the way instead: it extracts `embed` only (an embedding lookup; the capture
stops the forward there) of a GPT-2-small-shaped model (d=768, random weights), per token, to HDF5,
so the whole `neuronmap.extract` call, every step but the transformer blocks, is timed against
``ndarray.tofile`` + ``fsync`` of the same bytes (the baseline of `store_write.py` and
`extraction.py`). The two alternate ``--repeats`` times after one warm-up extraction (the disk's
speed drifts) and medians are compared; CPU seconds are reported beside wall seconds.

It is a CPU-side proxy, not the GPU figure: the GPU run adds a real forward and a device-to-host
copy (`gpu_extraction.py` measures that on a lent machine).

Usage::

    .venv/bin/python benchmarks/per_token_overhead.py                    # 8,000 prompts, ~770 MB
    .venv/bin/python benchmarks/per_token_overhead.py --prompts 2000 --repeats 3 --out /tmp/pt.json
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8000, help="prompts (the shipped set, cycled and numbered)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--format", default="hdf5", choices=("hdf5", "parquet"))
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder on the disk to measure")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def build_model(folder: Path) -> Path:
    """GPT2Config() shape (12 blocks, d=768) with a 1,024-id vocabulary and the tiny GPT-2's BPE tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from neuronmap.models.tiny import make_tiny

    model_dir = folder / "gpt2-small-shape"
    if not (model_dir / "config.json").exists():
        tiny = make_tiny("gpt2", folder / "tiny-gpt2")
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=1024, bos_token_id=0, eos_token_id=0)
        GPT2Model(config).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(model_dir)
    return model_dir


def raw_write(path: Path, nbytes: int) -> float:
    array = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    started = time.perf_counter()
    with open(path, "wb") as fh:
        array.tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import pandas as pd
    import torch

    import neuronmap
    from neuronmap.models import load_model
    from neuronmap.prompts import DEFAULT_PROMPTS

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="nm-pt-overhead-", dir=args.workdir))
    try:
        loaded = load_model(str(build_model(work)), device="cpu")
        shipped = pd.read_csv(DEFAULT_PROMPTS)["text"].tolist()
        texts = [f"{shipped[i % len(shipped)]} ({i})" for i in range(args.prompts)]

        def extract() -> tuple[float, float, int]:
            out = work / "run"
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu = time.perf_counter(), time.process_time()
            run = neuronmap.extract(loaded, texts, layers="embed", pooling="none", out=out, format=args.format,
                                    batch_size=64, max_length=128)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            return wall, cpu, run.n_rows("embed") * 768 * 4

        _, _, nbytes = extract()  # warm-up: imports, first-touch of the allocator's pools
        walls, cpus, raws = [], [], []
        for _ in range(args.repeats):
            wall, cpu, _ = extract()
            walls.append(wall)
            cpus.append(cpu)
            raws.append(raw_write(work / "raw.bin", nbytes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = nbytes / 1e6
    result = {
        "prompts": args.prompts, "format": args.format, "activation_mb": round(mb, 1),
        "extract_s": walls, "extract_cpu_s": cpus, "raw_write_s": raws,
        "extract_mb_s": round(mb / statistics.median(walls), 1), "raw_write_mb_s": round(mb / statistics.median(raws), 1),
        "ratio": round(statistics.median(raws) / statistics.median(walls), 3),
    }
    print(f"per-token `embed`, {args.prompts} prompts, {mb:.0f} MB ({args.format}): extract "
          f"{result['extract_mb_s']:.0f} MB/s (median of {args.repeats}; CPU {statistics.median(cpus):.2f} s per "
          f"{statistics.median(walls):.2f} s), raw write {result['raw_write_mb_s']:.0f} MB/s: ratio {result['ratio']:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
