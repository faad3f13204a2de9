"""Device -> host copy of one shard's activations: the way extraction copies now against the
alternatives, to decide whether pinned host buffers are worth building (an open question of #2).

`extract_shard` assembles a shard on the device and copies it to the host once, with
`tensor.cpu()`: fresh pageable memory each shard. Measured here, for a 128 MB float32 shard:

- `fresh pageable`: `tensor.cpu()` (what extraction does);
- `reused pageable`: `host.copy_(tensor)` into one pageable buffer allocated once;
- `reused pinned`: `host.copy_(tensor, non_blocking=True)` into a pinned buffer, then a synchronize.

Each is timed `--repeats` times, alternating; the report gives the median GB/s of each and the
ratio to the first. On a CPU device `.cpu()` returns the tensor itself and only the reused copy is a
real memcpy: that is a smoke run of the script, not a measurement.

    python benchmarks/d2h_copy.py --out d2h.json             # on a GPU machine
    python benchmarks/d2h_copy.py --device cpu --mb 16       # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mb", type=int, default=128, help="shard size in MB (default 128, extraction's target)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    n = args.mb * 1024**2 // 4
    shard = torch.randn(n, device=device)
    pinned_ok = device.type == "cuda"
    pageable = torch.empty(n)
    pinned = torch.empty(n, pin_memory=True) if pinned_ok else None

    def fresh() -> torch.Tensor:
        return shard.cpu()

    def reused() -> torch.Tensor:
        return pageable.copy_(shard)

    def reused_pinned() -> torch.Tensor:
        return pinned.copy_(shard, non_blocking=True)

    ways = {"fresh pageable": fresh, "reused pageable": reused}
    if pinned_ok:
        ways["reused pinned"] = reused_pinned
    for way in ways.values():  # warm up: first-touch of the buffers, CUDA context
        way()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            sync(device)
            start = time.perf_counter()
            host = way()
            sync(device)
            times[name].append(time.perf_counter() - start)
            assert host.shape == (n,)
    check = torch.equal(fresh(), shard.cpu()) and torch.equal(reused().clone(), shard.cpu())
    gbs = {name: args.mb / 1024 / statistics.median(values) for name, values in times.items()}
    base = gbs["fresh pageable"]
    result = dict(device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"), mb=args.mb,
                  repeats=args.repeats, seconds=times, gb_per_s=gbs,
                  ratio_to_fresh_pageable={name: value / base for name, value in gbs.items()}, same_values=check)
    for name, value in gbs.items():
        print(f"{name:16s} {value:7.2f} GB/s  ({value / base:.2f}x of fresh pageable)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if check else 1


if __name__ == "__main__":
    raise SystemExit(main())
