#!/usr/bin/env python
"""Ray scale-out benchmark (issue 3): the `--engine ray` commands against the in-process engine.

Every contender is the public entry point a user runs (`neuronmap.extract` for the in-process engine,
`actors.engine.run_ray_extraction` = `neuronmap extract --engine ray`), writing a whole run (shards,
manifest) of the same extraction; all runs are checked equal to the in-process run (exactly: one
torch thread everywhere). Wall time covers the whole call: planning, starting workers / stage actors
(each loads the model), extraction and commits; Ray itself is started once beforehand.

Model: GPT-2-small-shaped (`GPT2Config()` defaults: 12 blocks, d=768, 124M parameters), random weights
(seed 0), tiny GPT-2 tokenizer. Prompts: `--prompts` (default 1,000) random-word texts cut to exactly
`--tokens` (default 64) tokens (`max_length`). Layers `blocks.*` (12 blocks) mean-pooled, float32, CPU,
batches of `--batch-size` (16), `--samples-per-shard` (125: 8 shards, so two workers share them).

Contenders and ratios (targets from the issue):
1. in-process (this process, 1 thread) vs Ray with one worker (1 CPU): throughput ratio >= 0.80;
2. Ray, two workers x 1 CPU vs one worker x 1 CPU: >= 1.6x;
3. `--stages 2` vs `--stages 1`, one thread per stage: >= 1.5x;
4. peak RSS of each stage actor of `--stages 2` vs the unsharded worker's (item 1's): <= 0.6.

Wall-clock speedups need a free core per worker / stage. On a shared machine the report also gives
the CPU-bound ratio: CPU seconds of the busiest worker (stage) of the one-actor run over those of the
busiest of the two-actor run (process CPU time measured inside each shard / forward call), i.e. the
speedup with a dedicated core per actor.

Usage::

    .venv/bin/python benchmarks/ray_scale.py            # full size, ~20 min on 2 idle CPUs
    .venv/bin/python benchmarks/ray_scale.py --quick    # smoke run: small model, 48 prompts, ~2 min
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

MiB = 1024**2


def build_model(folder: Path, quick: bool) -> Path:
    """GPT2Config() defaults (or a small config with --quick), random weights (seed 0), tiny GPT-2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from neuronmap.models.tiny import make_tiny

    tiny = make_tiny("gpt2", folder.parent / "tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=128, n_layer=4, n_head=4) if quick else GPT2Config()
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


def make_prompts(n: int, tokens: int, seed: int = 0) -> list[str]:
    """Random-word texts long enough that `max_length=tokens` cuts every one to exactly `tokens` tokens."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return [" ".join("".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(2 * tokens)) for _ in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def worker_summary(records: list[dict]) -> dict[str, Any]:
    """Per worker process: shards, samples, CPU seconds inside shards, peak RSS."""
    workers: dict[int, dict[str, Any]] = {}
    for record in records:
        w = workers.setdefault(record["pid"], {"shards": 0, "samples": 0, "cpu_s": 0.0, "busy_s": 0.0,
                                               "peak_rss_MiB": 0.0})
        w["shards"] += 1
        w["samples"] += record["samples"]
        w["cpu_s"] += record["cpu_s"]
        w["busy_s"] += record["seconds"]
        w["peak_rss_MiB"] = max(w["peak_rss_MiB"], record["peak_rss"] / MiB)
    return {str(pid): w for pid, w in workers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, 48 prompts of 16 tokens")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    n_prompts = args.prompts or (48 if args.quick else 1000)
    n_tokens = args.tokens or (16 if args.quick else 64)
    per_shard = args.samples_per_shard or max(1, n_prompts // 8)
    out_json = args.json or Path(__file__).with_name("results-ray-scale-quick.json" if args.quick
                                                     else "results-ray-scale.json")

    import ray
    import torch

    import neuronmap
    from actors import options as ray_options
    from actors.engine import run_ray_extraction

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # the in-process engine on one thread, like a 1-CPU worker
    prompts = make_prompts(n_prompts, n_tokens)
    settings = dict(layers="blocks.*", pooling="mean", dtype="float32", format="hdf5", batch_size=args.batch_size,
                    max_length=n_tokens, samples_per_shard=per_shard)
    report: dict[str, Any] = {"quick": args.quick, "prompts": n_prompts, "tokens": n_tokens, **settings,
                              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                              "load_before": os.getloadavg()}
    tmp = Path(tempfile.mkdtemp(prefix="nm-ray-scale-"))
    try:
        folder = str(build_model(tmp / "gpt2-random", args.quick))
        ray_options.embedded_environment()
        with ray_options.quiet_logs():
            ray.init(**{**ray_options.embedded_init_kwargs(4), "num_cpus": 4})
        runs: dict[str, Any] = {}

        def contender(name: str, fn: Callable[[Path], Any]) -> float:
            out = tmp / name
            wall, runs[name] = timed(lambda: fn(out))
            report[name] = {"wall_s": wall, "samples_per_s": n_prompts / wall}
            print(f"{name}: {wall:.1f} s ({n_prompts / wall:.2f} samples/s)", flush=True)
            return wall

        contender("in_process", lambda out: neuronmap.extract(folder, prompts, out=out, **settings))
        for workers in (1, 2):
            records: list[dict] = []
            contender(f"ray_{workers}_worker", lambda out: run_ray_extraction(
                model=folder, prompts=prompts, out=out, workers=workers, cpus_per_worker=1, on_shard=records.append,
                **settings))
            report[f"ray_{workers}_worker"]["workers"] = worker_summary(records)
        for stages in (1, 2):
            info: list[dict] = []
            contender(f"stages_{stages}", lambda out: run_ray_extraction(
                model=folder, prompts=prompts, out=out, stages=stages, cpus_per_stage=1, on_stages=info.extend,
                **settings))
            report[f"stages_{stages}"]["stages"] = [
                {"blocks": f"{i['blocks'].start}-{i['blocks'].stop - 1}", "params_M": i["n_params"] / 1e6,
                 "cpu_s": i["cpu_s"], "busy_s": i["busy_s"], "peak_rss_MiB": i["peak_rss_bytes"] / MiB}
                for i in info]
        ray.shutdown()

        reference = runs["in_process"]
        for name, run in runs.items():  # every engine wrote the same run
            for layer in reference.layers:
                np.testing.assert_array_equal(run.array(layer), reference.array(layer), err_msg=f"{name} {layer}")
        report["all_runs_equal"] = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    one, two = report["ray_1_worker"], report["ray_2_worker"]
    s1, s2 = report["stages_1"], report["stages_2"]
    unsharded_rss = max(w["peak_rss_MiB"] for w in one["workers"].values())
    report["ratios"] = {
        "ray_1_worker_vs_in_process": report["in_process"]["wall_s"] / one["wall_s"],
        "ray_2_vs_1_worker": one["wall_s"] / two["wall_s"],
        "ray_2_vs_1_worker_cpu_bound": (max(w["cpu_s"] for w in one["workers"].values())
                                        / max(w["cpu_s"] for w in two["workers"].values())),
        "stages_2_vs_1": s1["wall_s"] / s2["wall_s"],
        "stages_2_vs_1_cpu_bound": max(s["cpu_s"] for s in s1["stages"]) / max(s["cpu_s"] for s in s2["stages"]),
        "stage_peak_rss_vs_unsharded_worker": [s["peak_rss_MiB"] / unsharded_rss for s in s2["stages"]],
    }
    report["unsharded_worker_peak_rss_MiB"] = unsharded_rss
    report["load_after"] = os.getloadavg()
    out_json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
