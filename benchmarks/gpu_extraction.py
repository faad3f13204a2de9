"""Extraction on a GPU: tokens/s against a bare forward, per-token capture against a raw write.

The prepared script for a lent GPU machine (issue #3's device check; also the GPU side of #2's
per-token target). Everything is measured in one process, baselines beside NeuronMap:

1. **Llama-shaped ~1.1B model** (TinyLlama's shape: 22 blocks, d=2048, GQA 32/4 heads, random
   weights in bfloat16, written with `save_pretrained` and loaded through `neuronmap.load_model`):
   `neuronmap.extract(..., layers="blocks.*", pooling="mean")` against a bare `LlamaModel` forward
   over the same length-sorted, pre-tokenised batches. Reported as tokens/s of each and their ratio.
2. **Per-token capture** (GPT-2-small shape, float32, `blocks.*`, `pooling="none"`, HDF5): activation
   MB/s of `extract` against `ndarray.tofile` + `fsync` of the same arrays, one file per layer. On a
   GPU the forward is cheap, so this is where the store has to keep up with the disk.
3. **Agreement**: the same tiny GPT-2 extracted on the GPU and on the CPU (float32) agrees to 1e-4.

Run: `python benchmarks/gpu_extraction.py --out results.json` (needs CUDA; `--device cpu --quick`
is a smoke run of the same code on a laptop). Nothing here is a timed assertion: it prints a table
and writes JSON, and the figures go to benchmarks/BENCHMARKS.md by hand with the machine named.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small models and few prompts (CPU smoke run)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per measurement (default 4096; 64 quick)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder on the disk to measure")
    parser.add_argument("--out", type=Path, default=Path("gpu_extraction.json"))
    parser.add_argument("--skip", nargs="*", default=(), choices=("llama", "per-token", "agreement"))
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one extract per step")
    return parser.parse_args(argv)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts_frame(n: int) -> Any:
    """The shipped prompt set, cycled to `n` rows (variable lengths, as users' prompt sets are)."""
    import pandas as pd

    from neuronmap.prompts import DEFAULT_PROMPTS, load_prompts

    base = load_prompts(DEFAULT_PROMPTS)
    reps = -(-n // len(base))
    texts = (base["text"].tolist() * reps)[:n]
    return pd.DataFrame({"text": [f"{t} ({i // len(base)})" if i >= len(base) else t for i, t in enumerate(texts)]})


def sorted_batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int, device: str) -> tuple[list, int]:
    """Pre-tokenised, length-sorted, padded batches on the device (the bare forward's input)."""
    import torch

    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches, pad = [], tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = [ids[i] for i in order[start : start + batch_size]]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, x in enumerate(chunk):
            input_ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        batches.append((input_ids.to(device), mask.to(device)))
    return batches, int(sum(len(x) for x in ids))


def timed(fn: Any, device: str, repeats: int, before: Any = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        gc.collect()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def build_llama(out: Path, quick: bool, device: str) -> Path:
    """Random Llama weights of TinyLlama's shape (or a small one with --quick), saved for `from_pretrained`."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from neuronmap.models.tiny import make_tiny

    tokenizer_dir = out.parent / "tok-llama"
    make_tiny("llama", tokenizer_dir, seed=0)  # its working tokenizer is reused
    shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2) if quick else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **shape)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = LlamaModel(config).to(dtype)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    (out / "n_params.txt").write_text(str(n_params))
    return out


def llama_bench(args: argparse.Namespace, scratch: Path, log: Any) -> dict:
    import torch
    from transformers import AutoTokenizer

    import neuronmap

    path = build_llama(scratch / "llama", args.quick, args.device)
    n_params = int((path / "n_params.txt").read_text())
    frame = prompts_frame(args.prompts)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    loaded = neuronmap.load_model(path, device=args.device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches, n_tokens = sorted_batches(tokenizer, frame["text"].tolist(), args.batch_size, args.max_length, args.device)
    bare = loaded.model  # the very same weights: a bare forward of the model NeuronMap hooks

    def forward() -> None:
        with torch.inference_mode():
            for input_ids, mask in batches:
                bare(input_ids=input_ids, attention_mask=mask, use_cache=False)

    def extract() -> None:  # into a new folder: deleting the last run is not part of extracting
        out = scratch / "llama-run" / f"{time.perf_counter_ns()}"
        neuronmap.extract(loaded, frame, layers="blocks.*", pooling="mean", out=out,
                          batch_size=args.batch_size, max_length=args.max_length)

    from neuronmap.extraction import STORAGE_DTYPES, BatchPooler, HostBuffers, extract_shard, plan_run

    host = HostBuffers(pin=args.device.startswith("cuda"))  # extract's reused (pinned) shard buffers

    def capture_only() -> None:  # what extract does minus the store: plan, hooks, pooling, device->host
        run_plan, tokens, plan = plan_run(loaded, frame["text"].tolist(), "blocks.*", "mean", "float32",
                                          args.max_length, None)
        pooler = BatchPooler("mean", STORAGE_DTYPES["float32"], run_plan.pattern_width)
        for samples in run_plan.shards():
            arrays = extract_shard(loaded, plan, tokens, samples, pooler, args.batch_size, host=host, wait=False)
        dict(arrays)  # waits for the last shard's copy, as extract's commit does

    forward()
    extract()  # warm-up (CUDA kernels, allocator)
    t_forward, t_extract, t_capture = [], [], []
    for _ in range(args.repeats):  # alternate so drift hits all
        t_forward += timed(forward, args.device, 1)
        t_extract += timed(extract, args.device, 1, before=lambda: shutil.rmtree(scratch / "llama-run", ignore_errors=True))
        t_capture += timed(capture_only, args.device, 1)
    mf, me, mc = statistics.median(t_forward), statistics.median(t_extract), statistics.median(t_capture)
    if args.profile:
        profiled(extract, "llama extract", log)
    row = dict(model=f"Llama-shaped {n_params / 1e9:.2f}B random ({dtype})", n_params=n_params, n_prompts=len(frame),
               n_tokens=n_tokens, batch_size=args.batch_size, max_length=args.max_length,
               times=dict(bare_forward=t_forward, extract=t_extract, capture_only=t_capture),
               tokens_per_s=dict(bare_forward=n_tokens / mf, extract=n_tokens / me, capture_only=n_tokens / mc),
               ratio=mf / me, ratio_capture_only=mf / mc)
    log(f"llama: {n_tokens} tokens, bare forward {n_tokens / mf:,.0f} tok/s, extract {n_tokens / me:,.0f} tok/s "
        f"(ratio {mf / me:.3f}), capture without the store {n_tokens / mc:,.0f} tok/s (ratio {mf / mc:.3f})")
    del loaded, bare
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def profiled(fn: Any, label: str, log: Any) -> None:
    """Print where one call spends its time (main thread; waits on the GPU show in the syncing call)."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.runcall(fn)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(22)
    log(f"--- profile of {label} ---\n" + "\n".join(text.getvalue().splitlines()[4:40]))


def fsync_write(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        array.tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())


def per_token_bench(args: argparse.Namespace, scratch: Path, log: Any) -> dict:
    import torch
    from transformers import GPT2Config, GPT2Model

    import neuronmap
    from neuronmap.models.tiny import make_tiny

    tiny = make_tiny("gpt2", scratch / "tok-gpt2", seed=0)
    path = scratch / "gpt2-small"
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4) if args.quick else GPT2Config()
    config.vocab_size = 50257
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(path)
    for f in Path(tiny).iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            shutil.copy(f, path / f.name)
    loaded = neuronmap.load_model(path, device=args.device, dtype="float32")
    frame = prompts_frame(max(args.prompts // 2, 32))

    def extract(out: Path, samples_per_shard: int | None = None) -> Any:
        return neuronmap.extract(loaded, frame, layers="blocks.*", pooling="none", format="hdf5", out=out,
                                 overwrite=True, batch_size=args.batch_size, max_length=args.max_length,
                                 samples_per_shard=samples_per_shard)

    warm = extract(scratch / "pt-warm")
    default_sps = int(warm.manifest.extra["samples_per_shard"])
    # the CPU default (128 MB shards) beside the device's default, in the same loop: what the shard size buys
    from neuronmap.extraction import SHARD_TARGET_BYTES, shard_target_bytes

    small_sps = max(1, default_sps * SHARD_TARGET_BYTES // shard_target_bytes(args.device, per_token=True))
    arrays = {name: warm.array(name) for name in warm.layers}
    warm_manifest = warm.manifest.model_copy(deep=True, update={"shards": [], "status": "running"})
    first = warm.layers[0]
    shards = [(sh.index, sh.rows, sh.samples, warm.sample_ids(first, sh.rows), warm.token_index(first, sh.rows))
              for sh in warm.shards(first)]
    payload = sum(a.nbytes for a in arrays.values())
    shutil.rmtree(scratch / "pt-warm")
    t_extract, t_raw, t_small = [], [], []
    for r in range(args.repeats):
        out = scratch / f"pt-{r}"
        t_extract += timed(lambda: extract(out), args.device, 1)
        shutil.rmtree(out, ignore_errors=True)
        if small_sps != default_sps:
            t_small += timed(lambda: extract(out, small_sps), args.device, 1)
            shutil.rmtree(out, ignore_errors=True)
        raw = scratch / f"raw-{r}"
        raw.mkdir()
        start = time.perf_counter()
        for i, name in enumerate(arrays):
            fsync_write(raw / f"{i}.bin", arrays[name])
        t_raw.append(time.perf_counter() - start)
        shutil.rmtree(raw, ignore_errors=True)
    me, mr = statistics.median(t_extract), statistics.median(t_raw)
    store = store_only(warm_manifest, shards, arrays, scratch, args.repeats, log, mr)
    if args.profile:
        profiled(lambda: extract(scratch / "pt-profile"), "per-token extract", log)
    mb = payload / 1e6
    row = dict(model="GPT-2-small shape, float32" if not args.quick else "tiny GPT-2", layers="blocks.*",
               n_prompts=len(frame), n_tokens=int(warm.manifest.n_tokens or 0), activation_bytes=int(payload),
               times=dict(extract=t_extract, raw_write=t_raw), mb_s=dict(extract=mb / me, raw_write=mb / mr),
               ratio=mr / me, store_only=store, samples_per_shard=default_sps, n_shards=len(shards))
    log(f"per-token: {mb:.0f} MB in {len(shards)} shards, extract {mb / me:,.0f} MB/s, raw write {mb / mr:,.0f} MB/s, "
        f"ratio {mr / me:.3f}")
    if t_small:
        ms = statistics.median(t_small)
        row.update(samples_per_shard_128mb=small_sps, times_128mb=t_small, ratio_128mb=mr / ms)
        log(f"per-token with 128 MB shards ({small_sps} samples each): extract {mb / ms:,.0f} MB/s, ratio {mr / ms:.3f}")
    return row


def store_only(manifest: Any, shards: list, arrays: dict, scratch: Path, repeats: int, log: Any,
               raw_s: float) -> dict:
    """`RunWriter.write_shards` alone over the same shards: threads per shard, and 4x larger shards."""
    import neuronmap.store.writer as writer_module
    from neuronmap.store import RunWriter

    def layout(group: int) -> list:
        merged = []
        for k in range(0, len(shards), group):
            part = shards[k : k + group]
            rows = (part[0][1][0], part[-1][1][1])
            merged.append((len(merged), rows, (part[0][2][0], part[-1][2][1]), np.concatenate([p[3] for p in part]),
                           np.concatenate([p[4] for p in part])))
        return merged

    results, default_threads = {}, writer_module.SHARD_THREADS
    try:
        for label, threads, group in (("threads4", 4, 1), ("threads12", 12, 1), ("threads12_4x_shards", 12, 4)):
            writer_module.SHARD_THREADS = threads
            plan = layout(group)
            times = []
            for r in range(repeats):
                out = scratch / f"store-{label}-{r}"
                start = time.perf_counter()
                writer = RunWriter(out, manifest)
                for index, rows, samples, ids, tokens in plan:
                    writer.write_shards(index, rows=rows, samples=samples,
                                        arrays={n: a[rows[0] : rows[1]] for n, a in arrays.items()},
                                        sample_ids=ids, token_index=tokens)
                times.append(time.perf_counter() - start)
                shutil.rmtree(out, ignore_errors=True)
            med = statistics.median(times)
            results[label] = dict(times=times, n_shards=len(plan), ratio_to_raw=raw_s / med)
            log(f"  store only, {label}: {len(plan)} shards, ratio to raw write {raw_s / med:.3f}")
    finally:
        writer_module.SHARD_THREADS = default_threads
    return results


def agreement(args: argparse.Namespace, scratch: Path, log: Any) -> dict:
    import neuronmap
    from neuronmap.models.tiny import make_tiny

    tiny = make_tiny("gpt2", scratch / "agree-gpt2", seed=0)
    frame = prompts_frame(64)
    runs = {}
    for device in ("cpu", args.device):
        loaded = neuronmap.load_model(tiny, device=device, dtype="float32")
        runs[device] = neuronmap.extract(loaded, frame, layers="embed,blocks.*,final", pooling="mean",
                                         out=scratch / f"agree-{device.replace(':', '-')}", overwrite=True)
    worst = max(float(np.abs(runs["cpu"].array(n) - runs[args.device].array(n)).max()) for n in runs["cpu"].layers)
    log(f"agreement {args.device} vs cpu: max |diff| {worst:.2e} over {len(runs['cpu'].layers)} layers")
    return dict(max_abs_diff=worst, ok=worst < 1e-4, layers=runs["cpu"].layers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prompts is None:
        args.prompts = 64 if args.quick else 4096
    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu --quick for a smoke run", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    log = lambda text: print(text, flush=True)  # noqa: E731
    env = dict(device=args.device, torch=torch.__version__, transformers=transformers.__version__,
               gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None, cpus=os.cpu_count())
    log(json.dumps(env))
    results: dict[str, Any] = dict(environment=env, command=" ".join(["python", "benchmarks/gpu_extraction.py",
                                                                       *(argv if argv is not None else sys.argv[1:])]))
    with contextlib.ExitStack() as stack:
        scratch = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nm-gpu-")))
        scratch.mkdir(parents=True, exist_ok=True)
        steps = (("agreement", agreement), ("per-token", per_token_bench), ("llama", llama_bench))
        for name, step in steps:
            if name in args.skip:
                continue
            try:
                results[name] = step(args, scratch, log)
            except Exception as error:  # report and go on: one device call must bring back what it can
                results[name] = dict(error=f"{type(error).__name__}: {' '.join(str(error).split())[:500]}")
                log(f"{name} failed: {results[name]['error']}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0 if all("error" not in results.get(n, {}) for n, _ in steps if n not in args.skip) else 1


if __name__ == "__main__":
    sys.exit(main())
