#!/usr/bin/env python
"""Tokenising a whole prompt set on threads against one thread: what `tokenize_threads()` buys.

Why: every extraction tokenises all prompts before its first forward (planning needs every length),
so on a GPU, where a 1B model's forward over 4,096 prompts takes ~1.5 s, tokenising is time the
device waits. A fast tokenizer encodes with the GIL released, so `extraction.tokenize_batches`
encodes batches on `tokenize_threads()` threads (torch's CPU threads, at most 8). This times
`tokenize_prompts` on the shipped prompts, cycled and numbered, with 1 thread and with N, alternated
`--repeats` times, and checks both give the same ids. TOKENIZERS_PARALLELISM is false, as in the
`neuronmap` command and Ray tasks; in a Python session without it the Rust tokenizer already uses its
own thread pool (the two do not add up, nor get in each other's way).

Usage::

    .venv/bin/python benchmarks/tokenize_threads.py                        # 100,000 prompts, tiny Llama BPE
    .venv/bin/python benchmarks/tokenize_threads.py --tokenizer all-minilm-l6-v2 --prompts 200000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As the `neuronmap` command and Ray's tasks run (they switch the Rust tokenizer's own thread pool off,
# which is not safe across the forks that start Ray): the threads compared here are then the only ones.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="threads to compare with 1 (default tokenize_threads())")
    parser.add_argument("--tokenizer", default=None, help="model folder or registry name (default: a tiny Llama)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import pandas as pd

    from neuronmap.extraction import tokenize_prompts, tokenize_threads
    from neuronmap.models import load_model
    from neuronmap.models.tiny import make_tiny
    from neuronmap.prompts import DEFAULT_PROMPTS

    threads = args.threads or tokenize_threads()
    with tempfile.TemporaryDirectory(prefix="nm-tok-") as work:
        source = args.tokenizer or str(make_tiny("llama", Path(work) / "tiny-llama"))
        tokenizer = load_model(source, device="cpu").tokenizer
    shipped = pd.read_csv(DEFAULT_PROMPTS)["text"].tolist()
    texts = [f"{shipped[i % len(shipped)]} ({i})" for i in range(args.prompts)]

    tokenize_prompts(tokenizer, texts[:5000], 512)  # warm-up
    times: dict[int, list[float]] = {1: [], threads: []}
    results = {}
    for _ in range(args.repeats):
        for n in (1, threads):
            started = time.perf_counter()
            results[n] = tokenize_prompts(tokenizer, texts, 512, threads=n)
            times[n].append(time.perf_counter() - started)
    same = np.array_equal(results[1].ids.flat, results[threads].ids.flat) and \
        np.array_equal(results[1].lengths, results[threads].lengths)
    one, many = statistics.median(times[1]), statistics.median(times[threads])
    label = args.tokenizer or "tiny Llama BPE (models make-tiny llama)"
    result = {"prompts": args.prompts, "tokenizer": label, "threads": threads, "one_thread_s": times[1],
              "threads_s": times[threads], "speedup": round(one / many, 3), "same_ids": bool(same)}
    print(f"tokenise {args.prompts:,} prompts ({label}): 1 thread {one:.2f} s, {threads} threads {many:.2f} s "
          f"(medians of {args.repeats}): {result['speedup']:.2f}x; same ids: {same}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
