#!/usr/bin/env python
"""Mean pooling of every layer of a batch: NeuronMap's `bmm` form against the elementwise form.

What is measured: `--layers` hidden states of shape (`--batch`, `--seq`, `--width`) with random
real lengths per row, mean-pooled over the real tokens. Baseline: `(hidden * mask).sum(1) / n` per
layer, the usual way to write it (seven tensor ops and a temporary the size of `hidden`). NeuronMap:
`extraction.BatchPooler`, as the capture hook calls it: `pooling.mean_weights` once for the batch,
then `pooling.mean_pool` (one `bmm`) per layer, half precision copied into one reused float32
buffer first. Both in
one process, alternated, median of `--repeats`; the results are compared (max |difference|) and
the top-level tensor ops of each are counted with torch's profiler (on a GPU each is a kernel launch).

Usage::

    .venv/bin/python benchmarks/pooling.py                        # Llama-1B-like: 22 x (64, 29, 2048)
    .venv/bin/python benchmarks/pooling.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def elementwise_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def count_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::") and event.cpu_parent is None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=29)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(args.batch, args.seq, args.width, generator=generator).to(args.device, getattr(torch, args.dtype))
              for _ in range(args.layers)]
    lengths = torch.randint(1, args.seq + 1, (args.batch,), generator=generator)
    mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long().to(args.device)
    # NeuronMap pools in float32 (BatchPooler casts half precision first); so does the baseline here
    baseline = lambda: [elementwise_mean(h.float(), mask) for h in hidden]  # noqa: E731

    from types import SimpleNamespace

    from neuronmap.extraction import BatchPooler

    pooler = BatchPooler("mean", torch.float32, pattern_width=1)  # what extraction's capture hook calls
    ref = SimpleNamespace(name="layer", kind="hidden")

    def neuronmap() -> list[torch.Tensor]:
        pooler.mask = mask  # a new batch: weights made once, then shared by every layer
        return [pooler(ref, h) for h in hidden]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    difference = max((a - b).abs().max().item() for a, b in zip(baseline(), neuronmap()))
    times: dict[str, list[float]] = {"elementwise": [], "neuronmap": []}
    for _ in range(args.repeats):
        for name, fn in (("elementwise", baseline), ("neuronmap", neuronmap)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    ops = {"elementwise": count_ops(baseline), "neuronmap": count_ops(neuronmap)}
    result = dict(shape=[args.layers, args.batch, args.seq, args.width], device=args.device, dtype=args.dtype,
                  median_ms={k: v * 1e3 for k, v in median.items()}, speedup=median["elementwise"] / median["neuronmap"],
                  tensor_ops=ops, max_abs_difference=difference, times_s=times)
    print(f"{args.layers} layers x ({args.batch}, {args.seq}, {args.width}) {args.dtype} on {args.device}: "
          f"elementwise {median['elementwise'] * 1e3:.2f} ms ({ops['elementwise']} ops), "
          f"neuronmap {median['neuronmap'] * 1e3:.2f} ms ({ops['neuronmap']} ops): "
          f"{result['speedup']:.2f}x; max |difference| {difference:.1e}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
