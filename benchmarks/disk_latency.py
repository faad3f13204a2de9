#!/usr/bin/env python
"""Latency of what a shard commit does per file, on one disk: create, fsync a file, fsync a folder.

Why: the store's cost per shard beside its bytes is a handful of these per layer (a temp file
created, fsynced, renamed, its folder fsynced, the manifest rewritten). Their latency differs by
machine far more than bandwidth does, so a lent machine's figures say whether its per-token
extraction is bound by bytes or by commits. Each figure is the median of `--repeats`, in ms.

Usage::

    .venv/bin/python benchmarks/disk_latency.py [--workdir /mnt/scratch] [--out latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder on the disk to measure")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="disk-latency-", dir=args.workdir))
    times: dict[str, list[float]] = {"create": [], "fsync_4k_file": [], "rename": [], "fsync_folder": []}
    try:
        for i in range(args.repeats):
            path = scratch / f"f{i}.tmp"
            fd = -1

            def create() -> None:
                nonlocal fd
                fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)

            times["create"].append(timed(create))
            os.write(fd, b"x" * 4096)
            times["fsync_4k_file"].append(timed(lambda: os.fsync(fd)))
            os.close(fd)
            times["rename"].append(timed(lambda: os.replace(path, scratch / f"f{i}")))
            folder = os.open(scratch, os.O_RDONLY)
            try:
                times["fsync_folder"].append(timed(lambda: os.fsync(folder)))
            finally:
                os.close(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {name: round(statistics.median(values), 4) for name, values in times.items()}
    print("median ms: " + ", ".join(f"{name} {value:.3f}" for name, value in result.items()))
    if args.out:
        args.out.write_text(json.dumps(dict(median_ms=result, repeats=args.repeats, times_ms=times), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
