#!/usr/bin/env python
"""Analysis at scale: streaming analyses of a large run in bounded memory, and CKA across many layers.

What is measured (numbers and the exact commands in benchmarks/BENCHMARKS.md, "Analysis at scale"):

1. A synthetic run of ``--gb`` GB (default 8) generated straight into shards with ``RunWriter``
   (``--layers`` layers of ``--width`` float32 features, ``--samples-per-shard`` rows per shard, HDF5;
   layer i+1 = 0.8 * layer i + 0.6 * fresh noise, so the layers are related). Free disk is checked
   first (``df -h``): the benchmark refuses to start below twice the run's size.
   Each of these runs in a fresh subprocess that reports its wall time and its peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end, imports included, cross-checked with
   /proc/self/status VmHWM; the run is written by a child too, because Linux carries a parent's RSS
   at fork into the child's ru_maxrss):

   - ``direct read``: every shard file read with ``O_DIRECT`` in 16 MiB blocks (the page cache
     bypassed: what the disk gives). ``raw read``: every shard's ``activations`` dataset read with
     plain h5py in ``--batch-size``-row slices into numpy, nothing else (measured before and after
     the analyses; the mean is the reference). ``store read``: the same rows through
     ``Run.iter_batches`` (neuronmap's reader).
   - ``stats``: ``analyze(run, "stats")`` over every layer (one pass; per-shard partials folded into
     the running result as they arrive; the default local engine: one shard task per core on
     threads, at most 4); ``stats_1_worker``: the same with ``engine=LocalEngine(workers=1)`` (one
     shard after another, one core); ``stats_2_workers``: ``LocalEngine(workers=2)``;
     ``stats_second_call``: the default engine, timed on the second ``analyze`` call of the same
     process (what a notebook, the dashboard or a Serve replica pays once numba's first-call set-up is
     behind it; the first call's time is in the JSON); ``stats_reservoir_1024``: the same as
     ``stats`` with ``reservoir_size=1024`` (the percentile sample each shard's partial carries);
     ``stats_copied_reads``: the same as ``stats`` with every batch read through h5py into a fresh
     array (what ``stats`` did before it read uncompressed HDF5 shards as mapped read-only views),
     the baseline of that change.
   - ``pca``: ``analyze(run, "pca", method="incremental", n_components=--pca-components, project=0)``
     (one streamed pass: the float64 covariance accumulated with BLAS, then one eigendecomposition)
     over every layer.
   - ``cka minibatch``: ``analyze(run, "cka", method="minibatch")`` over every layer pair (minibatches
     of 256 rows of both layers).

   Throughput is the analysed layers' activation bytes over the wall time of the ``analyze`` call
   (artifact writing included, imports excluded); the ratio is against the raw read of the same bytes.
   The shard files were just written, so both reads come from the page cache when the run fits in
   free memory; the report says how much memory was free.

2. Linear CKA across ``--cka-layers`` x ``--cka-layers`` layer pairs at n = ``--cka-n`` samples,
   d = ``--width`` (in-memory float32 arrays, generated like the run's layers):
   ``neuronmap.analysis.cka_matrix.cka_matrix(layers)`` (feature-space form: each layer's
   self-moments once, every pair's cross-moments once, never an n x n matrix). Against the Gram-matrix
   form on the largest n it can hold here: each layer's centred Gram matrix ``X X^T`` prepared once
   (``_PreparedGram``, the cache ``cka_matrix(method="rbf")`` uses) and every pair's HSIC from them;
   ``--cka-layers + 2`` n x n float64 matrices must fit in ``--gram-budget-gb`` (default: 40% of the
   memory available at start). Both forms run on the same arrays at that n, their matrices are
   compared (max abs difference), and the ratio of their times is reported; the Gram form's time at
   the feature form's n is extrapolated (its cost grows as n^2, and its memory, 8 n^2 bytes per
   layer, does not fit).

3. The registered ``cka`` analysis (linear) over every pair of ``--pairs-layers`` layers of a run of
   ``--pairs-n`` rows x ``--width`` float32 (written like part 1's): ``analyze(run, "cka")``, which
   computes each layer's self-moments once and each pair's cross-moments once (L + L (L - 1) / 2
   moment passes), against the per-pair form it replaced, ``linear_cka`` on the two layers' batch
   factories for every pair (both layers' self-moments again for every pair: 3 L (L - 1) / 2 passes),
   each in its own child process; the values are compared (max abs difference).

4. ``RunningStats.add`` in isolation (unless ``--skip-kernel``): 16 distinct 4096 x ``--width``
   float32 batches (more than the CPU cache) folded in round robin for about 2 s, by 1 and by 2
   threads (each thread its own ``RunningStats``, as two shard tasks); the baseline in the same child
   is ``np.copyto`` of the same batches into one float32 buffer (a memory copy: what reading each
   value once costs). Reported as GB/s of float32 input and as a ratio to the copy.

Usage::

    .venv/bin/python benchmarks/analysis_scale.py                    # 8 GB run + CKA at n=50,000
    .venv/bin/python benchmarks/analysis_scale.py --gb 1 --skip-cka  # smaller run only
    .venv/bin/python benchmarks/analysis_scale.py --skip-cka --steps direct_read,raw_read_before,stats
    .venv/bin/python benchmarks/analysis_scale.py --skip-scale --skip-cka --pairs-layers 6   # part 3 (+ 4)
    .venv/bin/python benchmarks/analysis_scale.py --skip-scale --skip-cka --skip-pairs       # part 4 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=8.0, help="size of the synthetic run's activations (default 8)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the synthetic run (default 2)")
    parser.add_argument("--width", type=int, default=768, help="features per layer (default 768)")
    parser.add_argument("--samples-per-shard", type=int, default=65536, help="rows per shard (default 65536)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per streamed batch (default 4096)")
    parser.add_argument("--pca-components", type=int, default=64, help="IncrementalPCA components (default 64)")
    parser.add_argument("--dir", type=Path, default=None, help="where the synthetic run goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic run afterwards")
    parser.add_argument("--run", type=Path, default=None,
                        help="analyse this existing run instead of writing one (never deleted; --gb etc. ignored)")
    parser.add_argument("--cka-n", type=int, default=50_000, help="samples for the CKA matrix (default 50000)")
    parser.add_argument("--cka-layers", type=int, default=12, help="layers of the CKA matrix (default 12)")
    parser.add_argument("--gram-budget-gb", type=float, default=None,
                        help="memory the Gram form may use (default 40%% of MemAvailable)")
    parser.add_argument("--gram-n", type=int, default=None, help="n of the Gram form (default: largest in budget)")
    parser.add_argument("--steps", type=lambda v: v.split(","), default=None,
                        help="part 1 steps to run, comma-separated (default all): direct_read, raw_read_before, "
                             "store_read, stats, stats_1_worker, stats_2_workers, stats_second_call, stats_reservoir_1024, "
                             "stats_copied_reads, "
                             "pca_incremental, cka_minibatch, "
                             "raw_read_after")
    parser.add_argument("--skip-scale", action="store_true", help="skip part 1 (the large run)")
    parser.add_argument("--skip-cka", action="store_true", help="skip part 2 (CKA matrix)")
    parser.add_argument("--pairs-layers", type=int, default=6, help="part 3: layers of the cka pairs run (default 6)")
    parser.add_argument("--pairs-n", type=int, default=20_000, help="part 3: rows of the cka pairs run (default 20000)")
    parser.add_argument("--skip-pairs", action="store_true", help="skip part 3 (registered cka over layer pairs)")
    parser.add_argument("--skip-kernel", action="store_true", help="skip part 4 (RunningStats.add in isolation)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP threads of every measured process (default 1: on a busy machine two "
                             "threads spin-wait and run several times slower)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-analysis-scale.json")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """ru_maxrss of this process in MB. Linux carries the pre-exec high-water mark over execve, so a child
    reports at least its parent's RSS at fork: the parent stays small (the run is written by a child)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def vm_hwm_mb() -> float | None:
    """VmHWM of this process image in MB (peak RSS since exec), the cross-check of ru_maxrss."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


THREADS = 1


def run_child(args: list[str], timeout: float | None = None) -> dict:
    """Run this script with `--child ...` in a fresh interpreter; its last stdout line is JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    threads = {key: str(THREADS) for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **threads})
    if done.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def related_layers(rng: np.random.Generator, n: int, width: int, count: int):
    """Yield `count` float32 arrays (n, width): layer i+1 = 0.8 * layer i + 0.6 * noise."""
    h = rng.standard_normal((n, width), dtype=np.float32)
    for _ in range(count):
        yield h
        h = 0.8 * h + 0.6 * rng.standard_normal((n, width), dtype=np.float32)


def plan(args: argparse.Namespace) -> dict:
    row_bytes = args.width * 4
    n_rows = int(args.gb * GB / (args.layers * row_bytes))
    return {"n_rows": n_rows, "bytes": n_rows * row_bytes * args.layers, "row_bytes": row_bytes}


def check_disk(where: Path, needed: int) -> None:
    shown = subprocess.run(["df", "-h", str(where)], capture_output=True, text=True).stdout.strip()
    print(shown, flush=True)
    free = shutil.disk_usage(where).free
    if free < 2 * needed:
        sys.exit(f"refusing to start: the run needs {needed / GB:.1f} GB and {where} has {free / GB:.1f} GB free; "
                 f"this benchmark wants twice the run's size free ({2 * needed / GB:.1f} GB). Pass a smaller --gb "
                 "or a --dir on a larger disk")


def child_write(path: str, n_rows: int, n_layers: int, width: int, samples_per_shard: int) -> dict:
    """The synthetic run, shard by shard (memory: one shard of every layer)."""
    import pandas as pd

    from neuronmap.store import Manifest, RunWriter

    started = time.perf_counter()
    layers = [f"blocks.{i}" for i in range(n_layers)]
    manifest = Manifest.new(model="synthetic-scale", layers={n: dict(shape=[width], dtype="float32") for n in layers},
                            pooling="mean", dtype="float32", prompt_source="synthetic", prompt_source_hash="scale",
                            n_samples=n_rows)
    writer = RunWriter(path, manifest)
    writer.write_prompts(pd.DataFrame({"text": np.char.add("p", np.arange(n_rows).astype(str))}))
    rng = np.random.default_rng(0)
    for index, start in enumerate(range(0, n_rows, samples_per_shard)):
        end = min(n_rows, start + samples_per_shard)
        for name, x in zip(layers, related_layers(rng, end - start, width, n_layers)):
            writer.write_shard(name, index, rows=(start, end), samples=(start, end), activations=x,
                               sample_ids=np.arange(start, end, dtype=np.int64))
    writer.complete()
    return {"seconds": time.perf_counter() - started, "shards_per_layer": index + 1}


# ---------------------------------------------------------------------------------------------
# children (each in a fresh process: its peak RSS is its own)
# ---------------------------------------------------------------------------------------------
def child_raw_read(run: str, batch_size: int) -> dict:
    import h5py

    started, total = time.perf_counter(), 0
    for path in sorted(Path(run, "activations").glob("*/part-*.h5")):
        with h5py.File(path, "r") as handle:
            data = handle["activations"]
            for start in range(0, data.shape[0], batch_size):
                block = data[start:start + batch_size]
                total += block.nbytes
    return {"seconds": time.perf_counter() - started, "bytes": total}


def child_direct_read(run: str, block: int = 16 << 20) -> dict:
    """Every shard file read with O_DIRECT (the page cache bypassed): what the disk gives."""
    import mmap

    buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    started, total = time.perf_counter(), 0
    for path in sorted(Path(run, "activations").glob("*/part-*.h5")):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            while True:
                got = os.readv(fd, [buffer])
                total += got
                if got < block:
                    break
        finally:
            os.close(fd)
    return {"seconds": time.perf_counter() - started, "bytes": total}


def child_store_read(run: str, batch_size: int) -> dict:
    from neuronmap.store import open_run

    handle = open_run(run)
    started, total = time.perf_counter(), 0
    for layer in handle.layers:
        for batch in handle.iter_batches(layer, batch_size=batch_size):
            total += batch.nbytes
    return {"seconds": time.perf_counter() - started, "bytes": total}


def child_analysis(run: str, name: str, params: str, batch_size: int, workers: int = 0, copied: int = 0,
                   calls: int = 1) -> dict:
    """`analyze` on the default local engine, or on `LocalEngine(workers)` when workers > 0.

    copied=1: `stats` reads its batches through h5py copies (`LayerInput.iter_batches`) instead of
    mapped views, for the A/B of the mapped reads. calls > 1: `analyze` runs that many times in this
    process; `seconds` is the last call's, `call_seconds` all of them.
    """
    from neuronmap.analysis import LocalEngine, analyze, list_analyses
    from neuronmap.store import open_run

    list_analyses()  # imports every family (scikit-learn, scipy) before the clock starts
    if copied:
        from neuronmap.analysis.builtin import statistics

        statistics._read_only_batches = lambda data: data.iter_batches()
    handle = open_run(run)
    total = sum(handle.n_rows(layer) * handle.layer_info(layer).size * 4 for layer in handle.layers)
    call_seconds = []
    for _ in range(max(1, calls)):
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            artifact = analyze(run, name, params=json.loads(params), batch_size=batch_size, force=True,
                               engine=LocalEngine(workers=workers) if workers else "local")
        call_seconds.append(time.perf_counter() - started)
    headline = {unit: {k: v for k, v in artifact.metrics(unit).items() if isinstance(v, (int, float))}
                for unit in artifact.units}
    return {"seconds": call_seconds[-1], "call_seconds": call_seconds, "bytes": total, "metrics": headline,
            "workers": workers or LocalEngine().workers}


def child_kernel(width: int, batch_size: int, seconds: float = 2.0) -> dict:
    """`RunningStats.add` on 1 and 2 threads, against a memory copy of the same batches."""
    import threading

    from neuronmap.analysis.statistics import RunningStats

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((batch_size, width), dtype=np.float32) * 2 + 1 for _ in range(16)]
    RunningStats().add(batches[0])  # compile or load the kernel before the clock starts

    def rate(work, threads: int) -> float:
        done = [0] * threads

        def loop(index: int) -> None:
            stats, end, i = RunningStats(), time.perf_counter() + seconds, 0
            while time.perf_counter() < end:
                work(stats, batches[i % len(batches)])
                i += 1
            done[index] = i

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(done) * batches[0].nbytes / (time.perf_counter() - started) / 1e9

    buffer = np.empty_like(batches[0])
    out = {"batch": [batch_size, width], "dtype": "float32"}
    for threads in (1, 2):
        out[f"add_gb_s_{threads}_thread"] = rate(lambda stats, batch: stats.add(batch), threads)
        out[f"copy_gb_s_{threads}_thread"] = rate(lambda stats, batch: np.copyto(buffer, batch), threads)
        out[f"add_over_copy_{threads}_thread"] = out[f"add_gb_s_{threads}_thread"] / out[f"copy_gb_s_{threads}_thread"]
    return out


def child_cka_feature(n: int, width: int, count: int) -> dict:
    from neuronmap.analysis.cka_matrix import cka_matrix

    layers = {f"l{i}": x for i, x in enumerate(related_layers(np.random.default_rng(1), n, width, count))}
    started = time.perf_counter()
    matrix = cka_matrix(layers)
    seconds = time.perf_counter() - started
    np.save(os.environ["BENCH_MATRIX_OUT"], matrix)
    return {"seconds": seconds, "n": n, "d": width, "layers": count, "cka_first_last": float(matrix[0, -1])}


def child_cka_gram(n: int, width: int, count: int) -> dict:
    from neuronmap.analysis.cka import _PreparedGram

    layers = list(related_layers(np.random.default_rng(1), n, width, count))
    started = time.perf_counter()
    prepared = []
    for x in layers:
        c = x.astype(np.float64)
        c -= c.mean(axis=0)
        prepared.append(_PreparedGram(c @ c.T, debiased=False))
    grams_done = time.perf_counter()
    matrix = np.eye(count)
    for i in range(count):
        for j in range(i + 1, count):
            matrix[i, j] = matrix[j, i] = prepared[i].cka(prepared[j])
    seconds = time.perf_counter() - started
    np.save(os.environ["BENCH_MATRIX_OUT"], matrix)
    return {"seconds": seconds, "gram_seconds": grams_done - started, "n": n, "d": width, "layers": count}


def child_cka_pairs_per_pair(run: str, batch_size: int) -> dict:
    """The per-pair form: every pair's linear CKA from scratch (both self-moments and the cross-moments)."""
    import itertools

    from neuronmap.analysis.cka import linear_cka
    from neuronmap.store import open_run

    handle = open_run(run)
    started = time.perf_counter()
    values = {}
    for first, second in itertools.combinations(handle.layers, 2):
        values[f"{first}|{second}"] = linear_cka(lambda: handle.iter_batches(first, batch_size=batch_size),
                                                 lambda: handle.iter_batches(second, batch_size=batch_size))
    return {"seconds": time.perf_counter() - started, "pairs": len(values), "cka": values}


def child_main(argv: list[str]) -> None:
    kind, rest = argv[0], argv[1:]
    if kind == "write":
        out = child_write(rest[0], *(int(v) for v in rest[1:]))
    elif kind == "raw-read":
        out = child_raw_read(rest[0], int(rest[1]))
    elif kind == "direct-read":
        out = child_direct_read(rest[0])
    elif kind == "store-read":
        out = child_store_read(rest[0], int(rest[1]))
    elif kind == "analysis":
        out = child_analysis(rest[0], rest[1], rest[2], int(rest[3]), *(int(v) for v in rest[4:7]))
    elif kind == "kernel":
        out = child_kernel(int(rest[0]), int(rest[1]))
    elif kind == "cka-pairs-per-pair":
        out = child_cka_pairs_per_pair(rest[0], int(rest[1]))
    elif kind == "cka-feature":
        out = child_cka_feature(int(rest[0]), int(rest[1]), int(rest[2]))
    elif kind == "cka-gram":
        out = child_cka_gram(int(rest[0]), int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown child {kind}")
    out["peak_rss_mb"] = peak_rss_mb()
    out["vm_hwm_mb"] = vm_hwm_mb()
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------
def part_scale(args: argparse.Namespace) -> dict:
    sizes = plan(args)
    report: dict = {"gb": args.gb, "layers": args.layers, "width": args.width, "n_rows": sizes["n_rows"],
                    "activation_bytes": sizes["bytes"], "samples_per_shard": args.samples_per_shard,
                    "batch_size": args.batch_size, "mem_available_gb_at_start": round(mem_available_bytes() / GB, 1)}
    if args.run:  # an existing run (kept): its own size, from its manifest
        workdir, run = None, args.run.resolve()
        manifest = json.loads((run / "manifest.json").read_text())
        widths = [int(np.prod(info["shape"])) for info in manifest["layers"].values()]
        report.update(existing_run=str(run), gb=None, layers=len(widths), width=widths[0],
                      n_rows=manifest["n_samples"], activation_bytes=manifest["n_samples"] * sum(widths) * 4,
                      samples_per_shard=None)
    else:
        base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        check_disk(base, sizes["bytes"])
        workdir = Path(tempfile.mkdtemp(prefix="neuronmap-scale-", dir=base))
        run = workdir / "run"
    try:
        if workdir is not None:
            print(f"writing a {sizes['bytes'] / GB:.2f} GB run ({args.layers} x {sizes['n_rows']} x {args.width} "
                  f"float32) to {run} ...", end=" ", flush=True)
            report["write"] = run_child(["write", str(run), str(sizes["n_rows"]), str(args.layers), str(args.width),
                                         str(args.samples_per_shard)])
            print(f"{report['write']['seconds']:.0f} s", flush=True)
        report["on_disk_bytes"] = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        b = str(args.batch_size)
        steps = [
            ("direct_read", ["direct-read", str(run)]),
            ("raw_read_before", ["raw-read", str(run), b]),
            ("store_read", ["store-read", str(run), b]),
            ("stats", ["analysis", str(run), "stats", "{}", b]),
            ("stats_1_worker", ["analysis", str(run), "stats", "{}", b, "1"]),
            ("stats_2_workers", ["analysis", str(run), "stats", "{}", b, "2"]),
            ("stats_second_call", ["analysis", str(run), "stats", "{}", b, "0", "0", "2"]),
            ("stats_reservoir_1024", ["analysis", str(run), "stats", json.dumps({"reservoir_size": 1024}), b]),
            ("stats_copied_reads", ["analysis", str(run), "stats", "{}", b, "0", "1"]),
            ("pca_incremental", ["analysis", str(run), "pca", json.dumps(
                {"method": "incremental", "n_components": args.pca_components, "project": 0}), b]),
            ("cka_minibatch", ["analysis", str(run), "cka", json.dumps({"method": "minibatch"}), b]),
            ("raw_read_after", ["raw-read", str(run), b]),
        ]
        for key, child in steps:
            if args.steps and key not in args.steps:
                continue
            print(f"{key} ...", end=" ", flush=True)
            found = run_child(child)
            found["throughput_mb_s"] = found["bytes"] / found["seconds"] / 1e6
            report[key] = found
            print(f"{found['seconds']:.1f} s, {found['throughput_mb_s']:.0f} MB/s, peak RSS {found['peak_rss_mb']:.0f} MB",
                  flush=True)
        raws = [report[key]["throughput_mb_s"] for key in ("raw_read_before", "raw_read_after") if key in report]
        raw = report["raw_read_mb_s"] = sum(raws) / len(raws) if raws else None
        for key in ("direct_read", "store_read", "stats", "stats_1_worker", "stats_2_workers", "stats_second_call",
                    "stats_reservoir_1024",
                    "stats_copied_reads", "pca_incremental", "cka_minibatch"):
            if key in report and raw:
                report[key]["ratio_to_raw_read"] = report[key]["throughput_mb_s"] / raw
            if key in report and "direct_read" in report and key != "direct_read":
                report[key]["ratio_to_direct_read"] = report[key]["throughput_mb_s"] / report["direct_read"]["throughput_mb_s"]
    finally:
        if workdir is not None and args.keep:
            print(f"kept {run}")
        elif workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def part_cka(args: argparse.Namespace) -> dict:
    count, width = args.cka_layers, args.width
    budget = args.gram_budget_gb * GB if args.gram_budget_gb else 0.4 * mem_available_bytes()
    gram_n = args.gram_n or int(np.sqrt(budget / (8 * (count + 2))) // 500 * 500)
    gram_n = min(gram_n, args.cka_n)
    report: dict = {"layers": count, "d": width, "n": args.cka_n, "gram_n": gram_n,
                    "gram_budget_gb": round(budget / GB, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        def timed(kind: str, n: int) -> tuple[dict, np.ndarray]:
            out = Path(tmp) / f"{kind}-{n}.npy"
            os.environ["BENCH_MATRIX_OUT"] = str(out)
            print(f"{kind} n={n} ...", end=" ", flush=True)
            found = run_child([kind, str(n), str(width), str(count)])
            print(f"{found['seconds']:.1f} s, peak RSS {found['peak_rss_mb']:.0f} MB", flush=True)
            return found, np.load(out)

        feature_big, _ = timed("cka-feature", args.cka_n)
        feature_small, m_feature = timed("cka-feature", gram_n)
        gram_small, m_gram = timed("cka-gram", gram_n)
    report["feature_at_n"] = feature_big
    report["feature_at_gram_n"] = feature_small
    report["gram_at_gram_n"] = gram_small
    report["max_abs_difference_at_gram_n"] = float(np.abs(m_feature - m_gram).max())
    report["gram_over_feature_at_gram_n"] = gram_small["seconds"] / feature_small["seconds"]
    report["gram_extrapolated_seconds_at_n"] = gram_small["seconds"] * (args.cka_n / gram_n) ** 2
    report["gram_memory_gb_at_n"] = 8 * args.cka_n ** 2 * (count + 2) / GB
    return report


def part_pairs(args: argparse.Namespace) -> dict:
    count, n = args.pairs_layers, args.pairs_n
    report: dict = {"layers": count, "n": n, "d": args.width, "pairs": count * (count - 1) // 2,
                    "moment_passes_shared": count + count * (count - 1) // 2,
                    "moment_passes_per_pair": 3 * count * (count - 1) // 2}
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(prefix="neuronmap-pairs-", dir=base))
    run, b = workdir / "run", str(args.batch_size)
    try:
        print(f"writing a {count} x {n} x {args.width} run for the cka pairs ...", end=" ", flush=True)
        report["write"] = run_child(["write", str(run), str(n), str(count), str(args.width), str(args.samples_per_shard)])
        print(f"{report['write']['seconds']:.0f} s", flush=True)
        print("cka per pair (linear_cka for every pair) ...", end=" ", flush=True)
        per_pair = report["per_pair"] = run_child(["cka-pairs-per-pair", str(run), b])
        print(f"{per_pair['seconds']:.1f} s, peak RSS {per_pair['peak_rss_mb']:.0f} MB", flush=True)
        print("cka analysis (self-moments shared) ...", end=" ", flush=True)
        shared = report["shared"] = run_child(["analysis", str(run), "cka", "{}", b])
        print(f"{shared['seconds']:.1f} s, peak RSS {shared['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["per_pair_over_shared"] = per_pair["seconds"] / shared["seconds"]
    report["max_abs_difference"] = max(abs(shared["metrics"][unit]["cka"] - value)
                                       for unit, value in per_pair["cka"].items())
    return report


def environment() -> dict:
    import h5py

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "neuronmap"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        git = head + (" + uncommitted changes in neuronmap/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        git = "unknown"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "h5py": h5py.__version__, "git": git,
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    global THREADS
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    THREADS = args.threads
    results: dict = {"command": " ".join([".venv/bin/python", "benchmarks/analysis_scale.py", *sys.argv[1:]]),
                     "environment": {**environment(), "blas_threads": args.threads}}
    started = time.perf_counter()
    if not args.skip_scale:
        results["scale"] = part_scale(args)
    if not args.skip_cka:
        results["cka"] = part_cka(args)
    if not args.skip_pairs:
        results["cka_pairs"] = part_pairs(args)
    if not args.skip_kernel:
        print("RunningStats.add in isolation ...", end=" ", flush=True)
        kernel = results["stats_kernel"] = run_child(["kernel", str(args.width), str(args.batch_size)])
        print(", ".join(f"{threads} thread(s) {kernel[f'add_gb_s_{threads}_thread']:.1f} GB/s "
                        f"({kernel[f'add_over_copy_{threads}_thread']:.2f}x a copy)" for threads in (1, 2)), flush=True)
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
