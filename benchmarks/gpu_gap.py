"""Where a GPU extraction's time goes beyond the bare forward: the same Llama-shaped model, step by step.

`gpu_extraction.py` found mean-pooled extraction of a 1B Llama at ~0.5 of a bare forward on an H100, with
the store costing nothing measurable. This script adds NeuronMap's pieces to the bare forward one at a
time, over the same prompts and one process, so the step that costs the time shows as the ratio that
drops:

- `bare`: `LlamaModel` forward over pre-tokenised, globally length-sorted batches already on the device.
- `bare_h2d`: the same, but each batch padded on the host and copied up as extraction does (`pad_batch`).
- `hooks`: `bare` inside `Capture` of `blocks.*` (keep each block's output, no pooling).
- `hooks_pool`: `bare` inside `Capture` with extraction's mean pooling (`BatchPooler`).
- `extract_shard`: extraction's own loop (`extract_shard`) over one shard of every prompt, no store.
- `capture_only`: tokenising, planning and `extract_shard` per planned shard (what `extract` does minus files).
- `extract`: `neuronmap.extract` itself, shards and manifest written.

For each it reports wall seconds and the seconds until the loop had queued its last kernel ("launch"):
launch close to wall means the host is the limit. Then, over a few batches of `bare` and of `extract_shard`,
torch's sync debug mode names every call that makes the host wait for the device (with its Python stack),
and a `torch.profiler` table shows where host and device time go.

Run on a CUDA machine: `python benchmarks/gpu_gap.py --out gap.json` (`--device cpu --quick`: a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_extraction import build_llama, prompts_frame, sorted_batches, sync  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a small Llama and few prompts (CPU smoke run)")
    parser.add_argument("--prompts", type=int, default=None, help="default 4096 (64 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-batches", type=int, default=12, help="0: no sync report or profile")
    parser.add_argument("--out", type=Path, default=Path("gpu_gap.json"))
    return parser.parse_args(argv)


def timed(fn: Any, device: str) -> tuple[float, float]:
    """(launch, wall) seconds of one call: until it returned, and until the device had finished."""
    gc.collect()
    sync(device)
    start = time.perf_counter()
    fn()
    launch = time.perf_counter() - start
    sync(device)
    return launch, time.perf_counter() - start


def syncing_calls(fn: Any, device: str) -> dict:
    """Where `fn` makes the host wait for the device: torch's sync debug mode warns at every synchronising
    call; each warning's Python stack (NeuronMap and transformers frames) is counted."""
    import torch

    if not device.startswith("cuda"):
        return {}
    counts: dict[str, int] = {}
    previous = warnings.showwarning

    def record(message: Any, *args: Any, **kwargs: Any) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-7:]))
        key = f"{str(message)[:80]} @ {where}"
        counts[key] = counts.get(key, 0) + 1

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = previous
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    import neuronmap
    from neuronmap.capture import Capture
    from neuronmap.extraction import (STORAGE_DTYPES, BatchPooler, HostBuffers, extract_shard, pad_batch,
                                      plan_extraction, plan_run, tokenize_prompts)

    n_prompts = args.prompts or (64 if args.quick else 4096)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-gap-"))
    path = build_llama(scratch / "llama", args.quick, args.device)
    frame = prompts_frame(n_prompts)
    texts = frame["text"].tolist()
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    loaded = neuronmap.load_model(path, device=args.device, dtype=dtype)
    adapter, model = loaded.adapter, loaded.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches, n_tokens = sorted_batches(tokenizer, texts, args.batch_size, args.max_length, args.device)
    tokens = tokenize_prompts(loaded.tokenizer, texts, args.max_length)
    order = np.argsort(tokens.lengths, kind="stable")
    host_batches = [[tokens.ids[i] for i in order[s : s + args.batch_size]] for s in range(0, len(order), args.batch_size)]
    refs = adapter.resolve("blocks.*")
    one_shard = plan_extraction(loaded, "blocks.*", "mean", STORAGE_DTYPES["float32"], tokens, len(texts))
    pad_id = loaded.tokenizer.pad_token_id
    host = HostBuffers(pin=args.device.startswith("cuda"))  # as `extract`: shards land in reused (pinned) memory

    def bare() -> None:
        with torch.inference_mode():
            for input_ids, mask in batches:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)

    def bare_h2d() -> None:
        with torch.inference_mode():
            for ids in host_batches:
                input_ids, mask = pad_batch(ids, pad_id, loaded.device)
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)

    def hooks() -> None:
        with torch.inference_mode(), Capture(refs, stop_early=True) as cap:
            for input_ids, mask in batches:
                cap.run(adapter.forward, input_ids, mask, refs)

    def hooks_pool() -> None:
        pooler = BatchPooler("mean", STORAGE_DTYPES["float32"], 0)
        with torch.inference_mode(), Capture(refs, pooler, stop_early=True) as cap:
            for input_ids, mask in batches:
                pooler.mask = mask
                cap.run(adapter.forward, input_ids, mask, refs)

    def shard() -> None:
        pooler = BatchPooler("mean", STORAGE_DTYPES["float32"], 0)
        extract_shard(loaded, one_shard, tokens, range(len(texts)), pooler, args.batch_size, host=host)

    def capture_only() -> None:
        run_plan, toks, plan = plan_run(loaded, texts, "blocks.*", "mean", "float32", args.max_length, None)
        pooler = BatchPooler("mean", STORAGE_DTYPES["float32"], run_plan.pattern_width)
        for samples in run_plan.shards():
            arrays = extract_shard(loaded, plan, toks, samples, pooler, args.batch_size, host=host, wait=False)
        dict(arrays)  # waits for the last shard's copy, as extract's commit does

    def extract() -> None:  # the whole thing, files included, into a new folder each time
        out = scratch / "runs" / f"{time.perf_counter_ns()}"
        neuronmap.extract(loaded, frame, layers="blocks.*", pooling="mean", out=out, batch_size=args.batch_size,
                          max_length=args.max_length)

    steps = dict(bare=bare, bare_h2d=bare_h2d, hooks=hooks, hooks_pool=hooks_pool, extract_shard=shard,
                 capture_only=capture_only, extract=extract)
    for fn in steps.values():  # warm-up: kernels, allocator, pinned host blocks
        fn()
    times: dict[str, list] = {name: [] for name in steps}
    for _ in range(args.repeats):  # alternated, so drift hits every step
        for name, fn in steps.items():
            times[name].append(timed(fn, args.device))
    wall = {name: statistics.median(w for _, w in t) for name, t in times.items()}
    launch = {name: statistics.median(lw for lw, _ in t) for name, t in times.items()}
    print(f"{n_tokens} tokens in {len(batches)} batches; {one_shard.samples_per_shard} samples in one shard")
    for name in steps:
        print(f"{name:>14}: wall {wall[name]:.3f} s, launch {launch[name]:.3f} s, "
              f"{n_tokens / wall[name]:,.0f} tok/s, ratio to bare {wall['bare'] / wall[name]:.3f}")

    result = dict(device=args.device, gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                  torch=torch.__version__, n_prompts=len(texts), n_tokens=n_tokens, batches=len(batches),
                  batch_size=args.batch_size, times=times, wall_s=wall, launch_s=launch,
                  ratio_to_bare={name: wall["bare"] / wall[name] for name in steps})
    args.out.write_text(json.dumps(result, indent=2))
    if args.profile_batches < 1:
        shutil.rmtree(scratch, ignore_errors=True)
        return 0
    from torch.profiler import ProfilerActivity, profile

    n = min(len(texts), args.profile_batches * args.batch_size)
    few = batches[: args.profile_batches]

    def bare_few() -> None:
        with torch.inference_mode():
            for input_ids, mask in few:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)

    def shard_few() -> None:
        extract_shard(loaded, one_shard, tokens, range(n), BatchPooler("mean", STORAGE_DTYPES["float32"], 0),
                      args.batch_size, host=host)

    blocking = dict(bare=syncing_calls(bare_few, args.device), extract_shard=syncing_calls(shard_few, args.device))
    for name, found in blocking.items():
        print(f"--- calls that wait for the device: {name}, {len(few)} batches ---")
        for key, count in found.items():
            print(f"{count:>5}  {key[:600]}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    tables = {}
    for name, fn in (("bare", bare_few), ("extract_shard", shard_few)):
        with profile(activities=activities) as prof:
            fn()
            sync(args.device)
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22)
        print(f"--- profile: {name} ---\n{tables[name]}")
    result.update(blocking=blocking, profile_tables=tables)
    args.out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
