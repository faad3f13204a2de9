#!/usr/bin/env python
"""Pipeline-parallel benchmark: ``--stages 2`` against ``--stages 1``, throughput and memory per stage actor.

What is measured (numbers and the exact command in benchmarks/BENCHMARKS.md, section "Pipeline parallel"):

Model: a GPT-2-small-shaped model (``GPT2Config()`` defaults: 12 blocks, d=768, 124M parameters),
random weights (seed 0), saved with ``save_pretrained`` (one 498 MB ``model.safetensors``) beside the
tiny GPT-2's tokenizer. Prompts: ``--prompts`` (default 1,000) random token-id sequences of exactly
``--tokens`` (default 64) tokens, the same for every contender. Layers: ``blocks.*`` mean-pooled
(12 blocks), float32, CPU.

1. Throughput (samples/s): ``PipelineExtractor.stream`` over all prompts in micro-batches of
   ``--micro-batch``, with one torch thread per stage actor (``threads_per_stage=1``,
   ``num_cpus_per_stage=1``), for ``stages=1`` (one actor holding all 12 blocks) and ``stages=2``
   (blocks 0-5 and 6-11). Both pipelines are started first and stay up; each is warmed up with two
   micro-batches, then they are timed alternately ``--repeats`` times (median reported), so a
   change in machine load hits both alike. Stage busy fractions (time inside ``forward`` / wall time)
   show how balanced the stages are. The pooled arrays of both are compared (must be equal).
   Wall-clock speedup needs a free core per stage; on a shared machine the report also gives the
   CPU-bound speedup: CPU seconds of the single stage over those of the busiest of the two stages
   (``time.process_time`` inside each ``forward``), i.e. the speedup with one dedicated core per stage.

   For scale, an unsharded data-parallel-style worker (one actor, one thread) runs the local engine's
   ``extract_shard`` over the same prompts with the same batch size: no pipeline, no transport.

2. Peak RSS (``ru_maxrss``) of each actor process, right after loading and after the timed runs:
   - each stage actor of ``stages=2`` and the single actor of ``stages=1``;
   - the unsharded worker above (``neuronmap.load_model(folder)``, i.e. ``from_pretrained``, then the
     same extraction work);
   - a bare actor that imports the same modules and loads nothing (the process baseline that every
     actor pays: Python, torch, transformers, the Ray worker).

Usage::

    .venv/bin/python benchmarks/pipeline_parallel.py                 # ~8 min on 2 idle CPUs
    .venv/bin/python benchmarks/pipeline_parallel.py --prompts 200   # smoke run
    .venv/bin/python benchmarks/pipeline_parallel.py --shape medium --prompts 64 --json /tmp/pp-medium.json
                                                                     # the memory ratio at a larger shape
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
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1024**2


# GPT-2 shapes (blocks, width, heads): the check is "small"; the larger ones show how the
# stage-memory ratio moves once the weights outweigh the ~0.4 GB every actor process starts with.
SHAPES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}


def build_model(folder: Path, shape: str = "small") -> Path:
    """GPT2Config() (or a larger GPT-2 shape), random weights (seed 0), with the tiny GPT-2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from neuronmap.models.tiny import make_tiny

    tiny = make_tiny("gpt2", folder.parent / "tiny-gpt2")
    torch.manual_seed(0)
    n_layer, n_embd, n_head = SHAPES[shape]
    GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head)).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


class UnshardedWorker:
    """What a data-parallel worker does: the whole model from ``load_model``, ``extract_shard`` over all prompts."""

    def __init__(self, folder: str) -> None:
        import torch

        from neuronmap.models import load_model

        torch.set_num_threads(1)
        self.loaded = load_model(folder, device="cpu")

    def run(self, ids: list[list[int]], batch_size: int) -> float:
        """Seconds to extract ``blocks.*`` mean-pooled for ``ids`` (one shard, ``batch_size`` batches)."""
        import torch

        from neuronmap.extraction import BatchPooler, TokenizedPrompts, extract_shard, plan_extraction

        lengths = np.array([len(seq) for seq in ids])
        tokens = TokenizedPrompts(ids, lengths, 0, int(lengths.max()))
        plan = plan_extraction(self.loaded, "blocks.*", "mean", torch.float32, tokens, len(ids))
        pooler = BatchPooler("mean", torch.float32, int(lengths.max()))
        began = time.time()
        extract_shard(self.loaded, plan, tokens, range(len(ids)), pooler, batch_size)
        return time.time() - began

    def peak_rss(self) -> int:
        from actors.stage_worker import peak_rss_bytes

        return peak_rss_bytes()


class BareWorker:
    """The same imports as a stage actor, no weights: the RSS every actor process starts from."""

    def __init__(self) -> None:
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401

        import actors.pipeline  # noqa: F401

    def peak_rss(self) -> int:
        from actors.stage_worker import peak_rss_bytes

        return peak_rss_bytes()


def timed_stream(pipe: Any, batches: list, width: int) -> tuple[float, list[dict], dict[int, dict[str, float]]]:
    """Wall seconds of one pass, its arrays, and per stage: busy fraction of the wall time and CPU seconds."""
    import ray

    began = time.time()
    results = [arrays for _, arrays in pipe.stream(batches, width)]
    wall = time.time() - began
    stages = {}
    for stage, actor in enumerate(pipe.actors):
        spans = [span for span in ray.get(actor.busy_intervals.remote()) if span[0] >= began]
        stages[stage] = {"busy": sum(end - start for start, end, _ in spans) / wall,
                         "cpu_s": sum(cpu for _, _, cpu in spans)}
    return wall, results, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small",
                        help="GPT-2 shape (small: the issue's check; medium/large: how the memory ratio scales)")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-pipeline.json"))
    args = parser.parse_args()

    import ray

    from actors.pipeline import PipelineExtractor, PipelineOptions

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, size=(args.prompts, args.tokens)).tolist()
    starts = range(0, args.prompts, args.micro_batch)
    batches = [(m, ids[start:start + args.micro_batch]) for m, start in enumerate(starts)]
    report: dict[str, Any] = {"prompts": args.prompts, "tokens": args.tokens, "micro_batch": args.micro_batch,
                              "repeats": args.repeats, "cpus": os.cpu_count(), "machine": platform.processor(),
                              "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / f"gpt2-{args.shape}-random", args.shape)
        report["shape"] = dict(zip(("blocks", "width", "heads"), SHAPES[args.shape]), name=args.shape)
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        pipes = {}
        for stages in (1, 2):
            options = PipelineOptions(stages=stages, num_cpus_per_stage=1, threads_per_stage=1,
                                      micro_batch_size=args.micro_batch)
            began = time.time()
            pipes[stages] = PipelineExtractor(str(folder), "blocks.*", pooling="mean", options=options).start()
            report[f"load_s_stages{stages}"] = time.time() - began
            list(pipes[stages].stream(batches[:2], args.tokens))  # warm-up
        walls: dict[int, list[float]] = {1: [], 2: []}
        critical: dict[int, list[float]] = {1: [], 2: []}
        outputs: dict[int, list] = {}
        for _ in range(args.repeats):
            for stages, pipe in pipes.items():
                wall, outputs[stages], per_stage = timed_stream(pipe, batches, args.tokens)
                walls[stages].append(wall)
                critical[stages].append(max(s["cpu_s"] for s in per_stage.values()))
                report[f"per_stage_stages{stages}"] = per_stage
        for a, b in zip(outputs[1], outputs[2]):
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
        for stages in (1, 2):
            report[f"samples_per_s_stages{stages}"] = args.prompts / statistics.median(walls[stages])
            # CPU seconds of the busiest stage: the pass's duration when every stage has a core to itself
            report[f"critical_cpu_s_stages{stages}"] = statistics.median(critical[stages])
            info = pipes[stages].info()
            loaded = pipes[stages].stage_info  # info() right after loading, before any forward
            report[f"stages{stages}"] = [
                {"blocks": f"{i['blocks'].start}-{i['blocks'].stop - 1}", "params_M": i["n_params"] / 1e6,
                 "peak_rss_after_load_MiB": at_load["peak_rss_bytes"] / MiB, "peak_rss_MiB": i["peak_rss_bytes"] / MiB,
                 "rss_now_MiB": {k: v / MiB for k, v in i["rss"].items()}}
                for i, at_load in zip(info, loaded)]
            pipes[stages].shutdown()
        unsharded = ray.remote(UnshardedWorker).options(num_cpus=1).remote(str(folder))
        ray.get(unsharded.run.remote(ids[: 2 * args.micro_batch], args.micro_batch))  # warm-up
        wall = statistics.median(ray.get(unsharded.run.remote(ids, args.micro_batch)) for _ in range(args.repeats))
        report["samples_per_s_unsharded_worker"] = args.prompts / wall
        report["unsharded_worker_peak_rss_MiB"] = ray.get(unsharded.peak_rss.remote()) / MiB
        bare = ray.remote(BareWorker).options(num_cpus=1).remote()
        report["bare_actor_peak_rss_MiB"] = ray.get(bare.peak_rss.remote()) / MiB
        ray.shutdown()
    report["load_after"] = os.getloadavg()
    report["speedup_2_vs_1"] = report["samples_per_s_stages2"] / report["samples_per_s_stages1"]
    report["cpu_bound_speedup_2_vs_1"] = report["critical_cpu_s_stages1"] / report["critical_cpu_s_stages2"]
    unsharded, base = report["unsharded_worker_peak_rss_MiB"], report["bare_actor_peak_rss_MiB"]
    single = report["stages1"][0]
    report["rss_ratio_stage_vs_unsharded_worker"] = [s["peak_rss_MiB"] / unsharded for s in report["stages2"]]
    report["rss_ratio_stage_vs_stages1_actor"] = [s["peak_rss_MiB"] / single["peak_rss_MiB"] for s in report["stages2"]]
    report["rss_ratio_after_load_vs_stages1_actor"] = [
        s["peak_rss_after_load_MiB"] / single["peak_rss_after_load_MiB"] for s in report["stages2"]]
    report["rss_ratio_above_bare_vs_unsharded_worker"] = [(s["peak_rss_MiB"] - base) / (unsharded - base)
                                                          for s in report["stages2"]]
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
