#!/usr/bin/env python
"""Extraction benchmark: NeuronMap against the forward-pass limit, hand-written code and two peers.

What is measured (see benchmarks/BENCHMARKS.md for the numbers and the exact command):

1. Throughput, one process, mean-pooled residual stream of all 12 blocks of a GPT-2-small-shaped model
   (``GPT2Config()`` defaults, random weights, saved with ``save_pretrained`` beside the tiny GPT-2's
   BPE tokenizer so every contender loads the same folder) over the shipped prompt set
   (``neuronmap.prompts.DEFAULT_PROMPTS``, all ~430 prompts; ``--quick`` takes every 9th, which keeps
   the length distribution). Same prompts, ``--batch-size``, ``--max-length`` and torch threads for all:

   - ``limit``: a bare ``GPT2Model`` forward (``use_cache=False``) over the same length-sorted,
     right-padded batches NeuronMap builds, tokenised and padded before the clock starts; no pooling,
     no copy to numpy, nothing written. This is the lower bound of the work.
   - ``neuronmap (hdf5|parquet)``: ``neuronmap.extract(loaded, prompts, layers="blocks.*",
     pooling="mean", format=..., out=<fresh dir>, overwrite=True)`` on a model loaded once with
     ``neuronmap.load_model(path, device="cpu")``; the clock covers everything ``extract`` does:
     tokenising, the shape probe, the forward, pooling, writing the shards, prompts and manifest.
   - ``hand-written``: ``AutoModelForCausalLM`` forward (LM head included) with
     ``output_hidden_states=True`` over unsorted batches (prompt order) padded by the tokenizer,
     mean-pooled in numpy, saved with ``np.savez``.
   - ``transformer-lens``: ``TransformerBridge.boot_transformers(path, tokenizer=...)``, then per batch
     ``run_with_cache(tokens, attention_mask=..., names_filter=[blocks.i.hook_resid_post])`` (default
     ``return_type="logits"``, so the LM head runs), pooled with torch on the cache.
   - ``nnsight``: ``LanguageModel(AutoModelForCausalLM..., tokenizer=...)``, per batch ``.trace()`` on
     the tokenised batch with ``model.transformer.h[i].output.save()`` for each block, pooled with torch.

   Hand-written and peers tokenise inside the clock (as NeuronMap does), in prompt order. Every
   contender is warmed up once on the first ``2 * batch_size`` prompts, then the contenders are timed
   round-robin ``--repeats`` times; the report gives the median. Before any number is reported, each
   contender's pooled arrays are compared with NeuronMap's (max abs difference, atol 1e-4).

2. Per-token capture (``pooling="none"``, ``blocks.0-3``, HDF5): activation bytes written per second by
   ``extract``, against ``np.ndarray.tofile`` + ``fsync`` of the same bytes (same arrays, one file per
   layer). Reported three ways: including the forward; ``extract`` minus a bare forward stopped after
   block 3 over the same batches; and NeuronMap's store alone (``RunWriter.write_shard`` of the same
   arrays). Plus a tiny-model run where the forward is small.

3. Peak RSS of ``extract`` (tiny GPT-2 from ``make_tiny``, ``blocks.*`` mean-pooled, HDF5) at 2,000 and
   20,000 prompts (the shipped set cycled), each in a fresh subprocess (``--rss-child N``), from
   ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end.

Usage::

    .venv/bin/python benchmarks/extraction.py                      # full run, ~12 min on 2 idle CPUs
    .venv/bin/python benchmarks/extraction.py --quick --skip-peers # smoke run, < 2 min
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import gc
import json
import logging
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
try:  # the installed (editable) neuronmap, or another tree on PYTHONPATH to benchmark a patch
    import neuronmap  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

ATOL = 1e-4
N_BLOCKS = 12  # GPT2Config() defaults
PER_TOKEN_LAYERS = "blocks.0-3"
PER_TOKEN_LAST_BLOCK = 3


# ---------------------------------------------------------------------------------------------
# set-up

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer prompts and repeats (< 2 min)")
    parser.add_argument("--skip-peers", action="store_true", help="do not run TransformerLens and nnsight")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results.json, or results-quick.json with --quick)")
    parser.add_argument("--stride", type=int, default=None,
                        help="use every N-th shipped prompt for the throughput and per-token parts "
                             "(default 1 = all of them; 9 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 3; 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every contender (default: CPU count)")
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=(2000, 20000), metavar=("SMALL", "LARGE"))
    parser.add_argument("--rss-repeats", type=int, default=None, help="subprocesses per size (default 2; 1 with --quick)")
    parser.add_argument("--rss-source", choices=("file", "frame"), default="file",
                        help="peak RSS: prompts from a JSONL file written beforehand (default, what a large "
                             "corpus is), or a DataFrame built inside the child (the caller's memory counts)")
    parser.add_argument("--rss-only", action="store_true", help="measure peak RSS only, then stop")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--markdown-from", type=Path, default=None, metavar="JSON",
                        help="print the Markdown tables of a results JSON (for BENCHMARKS.md) and exit")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-path", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make-tiny", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stride is None:
        args.stride = 9 if args.quick else 1
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.rss_repeats is None:
        args.rss_repeats = 1 if args.quick else 2
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.out is None:
        args.out = ROOT / "benchmarks" / ("results-quick.json" if args.quick else "results.json")
    return args


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("transformers", "transformer_lens", "nnsight", "datasets", "accelerate", "h5py", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def build_big_model(workdir: Path, tiny: Path) -> Path:
    """GPT-2-small-shaped random model (GPT2Config() defaults) saved beside the tiny GPT-2's BPE tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    big = workdir / "gpt2-small-random"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    model.save_pretrained(big)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.save_pretrained(big)
    del model
    gc.collect()
    return big


def fresh_tokenizer(path: Path) -> Any:
    """A tokenizer object of its own for each contender (nnsight changes padding_side in place)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def shipped_prompts(stride: int) -> Any:
    from neuronmap.prompts import DEFAULT_PROMPTS, load_prompts

    frame = load_prompts(DEFAULT_PROMPTS)
    return frame.iloc[::stride].drop(columns=["sample_id"]).reset_index(drop=True)


def cycled_prompts(n: int) -> Any:
    import pandas as pd

    from neuronmap.prompts import DEFAULT_PROMPTS, load_prompts

    frame = load_prompts(DEFAULT_PROMPTS).drop(columns=["sample_id"])
    reps = -(-n // len(frame))
    return pd.concat([frame] * reps, ignore_index=True).iloc[:n].reset_index(drop=True)


def token_lengths(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    ids = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    return ids, np.array([len(x) for x in ids], dtype=np.int64)


def sorted_padded_batches(ids: list[list[int]], lengths: np.ndarray, batch_size: int, pad_id: int) -> list[tuple]:
    """Length-sorted (longest first), right-padded (input_ids, attention_mask) batches."""
    import torch

    order = np.argsort(-lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        width = int(lengths[index].max())
        input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            input_ids[row, :lengths[i]] = torch.as_tensor(ids[i])
            mask[row, :lengths[i]] = 1
        batches.append((input_ids, mask))
    return batches


def padded_tokens(lengths: np.ndarray, batch_size: int, sort: bool) -> int:
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    return int(sum(lengths[order[s:s + batch_size]].max() * len(order[s:s + batch_size])
                   for s in range(0, len(order), batch_size)))


def fsync_write(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        array.tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())


class _Stop(Exception):
    pass


@contextlib.contextmanager
def stop_after(module: Any):
    """Forward hook that ends the forward once `module` ran (a bare forward through fewer blocks)."""
    def hook(*_: Any) -> None:
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# contenders

@dataclass
class Contender:
    name: str
    what: str
    # run(prepared, out) is timed and returns an untimed getter of the pooled arrays (or None);
    # prepare(frame) builds what run needs before the clock starts (only the limit pre-tokenises).
    run: Callable[[Any, Path], Callable[[], list[np.ndarray] | None]]
    ratio_target: float | None = None  # NeuronMap must be this much faster (peers) / this close (limit)
    prepare: Callable[[Any], Any] = lambda frame: frame
    times: list[float] = field(default_factory=list)
    result: list[np.ndarray] | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)


def make_contenders(args: argparse.Namespace, big: Path, skip_peers: bool, log: Callable[[str], None]) -> list[Contender]:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    import neuronmap

    B, M = args.batch_size, args.max_length
    contenders: list[Contender] = []

    def texts_of(frame: Any) -> list[str]:
        return frame["text"].tolist()

    # -- limit: bare GPT2Model forward over NeuronMap's length-sorted batches, tokenised beforehand ------
    limit_tok = fresh_tokenizer(big)
    base = AutoModel.from_pretrained(big).eval()

    def prepare_limit(frame: Any) -> list[tuple]:
        ids, lengths = token_lengths(limit_tok, texts_of(frame), M)
        return sorted_padded_batches(ids, lengths, B, limit_tok.pad_token_id)

    def run_limit(batches: list[tuple], _: Path):
        with torch.inference_mode():
            for input_ids, mask in batches:
                base(input_ids=input_ids, attention_mask=mask, use_cache=False)
        return lambda: None

    contenders.append(Contender("limit", "bare GPT2Model forward, length-sorted batches, pre-tokenised", run_limit,
                                prepare=prepare_limit))

    # -- NeuronMap ----------------------------------------------------------------------------------------
    loaded = neuronmap.load_model(big, device="cpu")

    def nm_runner(fmt: str, info: dict):
        def run(frame: Any, out: Path):
            result = neuronmap.extract(loaded, frame, layers="blocks.*", pooling="mean", format=fmt, out=out,
                                       overwrite=True, batch_size=B, max_length=M)

            def arrays() -> list[np.ndarray]:
                manifest = result.manifest
                info.update(samples_per_shard=manifest.extra.get("samples_per_shard"), n_samples=manifest.n_samples,
                            n_truncated=manifest.n_truncated, n_shard_files=len(manifest.shards))
                return [result.array(f"blocks.{i}") for i in range(N_BLOCKS)]
            return arrays
        return run

    for fmt in ("hdf5", "parquet"):
        info: dict = {}
        contenders.append(Contender(f"neuronmap ({fmt})", f"neuronmap.extract(format={fmt!r}) incl. tokenising + writing",
                                    nm_runner(fmt, info), ratio_target=0.95, info=info))

    # -- hand-written ----------------------------------------------------------------------------------------
    hand_tok = fresh_tokenizer(big)
    hand_model = AutoModelForCausalLM.from_pretrained(big).eval()

    def run_hand(frame: Any, out: Path):
        texts = texts_of(frame)
        pooled: list[list[np.ndarray]] = [[] for _ in range(N_BLOCKS)]
        with torch.inference_mode():
            for start in range(0, len(texts), B):
                enc = hand_tok(texts[start:start + B], padding=True, truncation=True, max_length=M, return_tensors="pt")
                output = hand_model(**enc, output_hidden_states=True)
                mask = enc["attention_mask"].numpy()[:, :, None].astype(np.float32)
                count = mask.sum(axis=1)
                for i in range(N_BLOCKS):
                    hidden = output.hidden_states[i + 1].numpy()
                    pooled[i].append((hidden * mask).sum(axis=1) / count)
        arrays = [np.concatenate(p) for p in pooled]
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "pooled.npz", *arrays)
        return lambda: arrays

    contenders.append(Contender("hand-written", "AutoModelForCausalLM output_hidden_states, prompt order, numpy pooling",
                                run_hand))

    if skip_peers:
        return contenders

    # -- TransformerLens 4.x ------------------------------------------------------------------------------------
    try:
        from transformer_lens.model_bridge import TransformerBridge

        tl_tok = fresh_tokenizer(big)
        bridge = TransformerBridge.boot_transformers(str(big), tokenizer=tl_tok, device="cpu")
        bridge.eval()
        names = [f"blocks.{i}.hook_resid_post" for i in range(N_BLOCKS)]

        def run_tl(frame: Any, _: Path):
            texts = texts_of(frame)
            pooled: list[list[np.ndarray]] = [[] for _ in range(N_BLOCKS)]
            with torch.inference_mode():
                for start in range(0, len(texts), B):
                    enc = tl_tok(texts[start:start + B], padding=True, truncation=True, max_length=M,
                                 return_tensors="pt")
                    _, cache = bridge.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"],
                                                     names_filter=names)
                    mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
                    count = mask.sum(dim=1)
                    for i, name in enumerate(names):
                        pooled[i].append(((cache[name] * mask).sum(dim=1) / count).numpy())
            arrays = [np.concatenate(p) for p in pooled]
            return lambda: arrays

        contenders.append(Contender(
            "transformer-lens", f"TransformerBridge {_dist_version('transformer-lens')} run_with_cache(names_filter), "
            f"padding {tl_tok.padding_side}", run_tl, ratio_target=1.5))
    except Exception as error:  # noqa: BLE001 -- report and go on
        contenders.append(Contender("transformer-lens", "TransformerBridge run_with_cache", _unavailable,
                                    ratio_target=1.5, error=f"{type(error).__name__}: {error}"))
        log(f"[yellow]transformer-lens unavailable: {type(error).__name__}: {error}")

    # -- nnsight 0.8 ----------------------------------------------------------------------------------------------
    try:
        import nnsight
        from nnsight import LanguageModel

        nn_tok = fresh_tokenizer(big)
        nn_model = LanguageModel(AutoModelForCausalLM.from_pretrained(big).eval(), tokenizer=nn_tok)

        def trace_blocks(enc: dict) -> list:
            with nn_model.trace(enc):
                saved = nnsight.save([])
                for i in range(N_BLOCKS):
                    saved.append(nn_model.transformer.h[i].output.save())
            return saved

        def run_nn(frame: Any, _: Path):
            texts = texts_of(frame)
            pooled: list[list[np.ndarray]] = [[] for _ in range(N_BLOCKS)]
            with torch.inference_mode():
                for start in range(0, len(texts), B):
                    # nn_model.tokenizer is nn_tok, which nnsight set to pad on the left (it corrects positions)
                    enc = nn_model.tokenizer(texts[start:start + B], padding=True, truncation=True, max_length=M,
                                             return_tensors="pt")
                    saved = trace_blocks(dict(enc))
                    mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
                    count = mask.sum(dim=1)
                    for i in range(N_BLOCKS):
                        pooled[i].append(((saved[i] * mask).sum(dim=1) / count).numpy())
            arrays = [np.concatenate(p) for p in pooled]
            return lambda: arrays

        contenders.append(Contender("nnsight", f"LanguageModel {_dist_version('nnsight')} .trace(), .output.save() "
                                    f"per block, padding {nn_tok.padding_side}", run_nn, ratio_target=1.5))
    except Exception as error:  # noqa: BLE001
        contenders.append(Contender("nnsight", "LanguageModel .trace()", _unavailable, ratio_target=1.5,
                                    error=f"{type(error).__name__}: {error}"))
        log(f"[yellow]nnsight unavailable: {type(error).__name__}: {error}")
    return contenders


def _unavailable(_: Any, __: Path):
    raise RuntimeError("unavailable")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def time_contenders(contenders: list[Contender], frame: Any, args: argparse.Namespace, scratch: Path,
                    log: Callable[[str], None]) -> None:
    """Warm each contender up once on the first 2 * batch_size prompts, then time them round-robin."""
    warm = frame.iloc[: 2 * args.batch_size].reset_index(drop=True)
    prepared: dict[str, Any] = {}
    for c in contenders:
        if c.error:
            continue
        try:
            out = scratch / f"warm-{_slug(c.name)}"
            start = time.perf_counter()
            c.run(c.prepare(warm), out)
            log(f"  warmed up {c.name} ({time.perf_counter() - start:.1f} s)")
            shutil.rmtree(out, ignore_errors=True)
            prepared[c.name] = c.prepare(frame)
        except Exception as error:  # noqa: BLE001
            c.error = _one_line(error)
            log(f"[yellow]  {c.name} failed in warm-up: {c.error}")
    for repeat in range(args.repeats):
        for c in contenders:
            if c.error:
                continue
            out = scratch / f"{_slug(c.name)}-r{repeat}"
            gc.collect()
            try:
                cpu, start = time.process_time(), time.perf_counter()
                getter = c.run(prepared[c.name], out)
                elapsed = time.perf_counter() - start
                cpu = time.process_time() - cpu
            except Exception as error:  # noqa: BLE001
                c.error = _one_line(error)
                log(f"[yellow]  {c.name} failed: {c.error}")
                continue
            c.times.append(elapsed)
            # CPU seconds per wall second of this process: ~threads when it had the cores to itself
            c.info.setdefault("cpu_per_wall", []).append(round(cpu / elapsed, 2))
            c.info.setdefault("load_avg_1min", []).append(round(os.getloadavg()[0], 2))
            if repeat == args.repeats - 1:
                c.result = getter()
            shutil.rmtree(out, ignore_errors=True)
            log(f"  repeat {repeat + 1}/{args.repeats} {c.name}: {elapsed:.2f} s (cpu/wall {cpu / elapsed:.2f})")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def check_numbers(contenders: list[Contender]) -> list[dict]:
    """Max abs difference of each contender's pooled blocks against NeuronMap (hdf5)."""
    reference = next((c.result for c in contenders if c.name == "neuronmap (hdf5)" and c.result), None)
    checks = []
    if reference is None:
        return checks
    for c in contenders:
        if c.name in ("limit", "neuronmap (hdf5)") or c.result is None:
            continue
        # HF's hidden_states[12] is ln_f(block 11 output), not block 11's output: compare blocks 0-10 there
        blocks = range(N_BLOCKS - 1) if c.name == "hand-written" else range(N_BLOCKS)
        diffs = [float(np.abs(c.result[i].astype(np.float64) - reference[i]).max()) for i in blocks]
        worst = max(diffs)
        checks.append(dict(contender=c.name, blocks=f"blocks.{blocks[0]}-{blocks[-1]}", max_abs_diff=worst,
                           ok=bool(worst <= ATOL),
                           note="hidden_states[i+1] for i<=10; hidden_states[12] is ln_f(blocks.11), not compared"
                           if c.name == "hand-written" else ""))
    return checks


# ---------------------------------------------------------------------------------------------
# per-token capture

def per_token_bench(args: argparse.Namespace, big: Path, tiny: Path, frame: Any, scratch: Path,
                    log: Callable[[str], None]) -> dict:
    import torch
    from transformers import AutoModel

    import neuronmap
    from neuronmap.store import RunWriter

    B, M = args.batch_size, args.max_length
    repeats = max(args.repeats, 1)
    write_repeats = 3 if args.quick else 9
    results: dict[str, Any] = {}

    def measure(model_path: Path, layers: str, last_block: int, prompts: Any, label: str) -> dict:
        loaded = neuronmap.load_model(model_path, device="cpu")
        base = AutoModel.from_pretrained(model_path).eval()
        tokenizer = fresh_tokenizer(model_path)
        ids, lengths = token_lengths(tokenizer, prompts["text"].tolist(), M)
        batches = sorted_padded_batches(ids, lengths, B, tokenizer.pad_token_id)

        def forward_only() -> None:
            with torch.inference_mode(), stop_after(base.h[last_block]):
                for input_ids, mask in batches:
                    with contextlib.suppress(_Stop):
                        base(input_ids=input_ids, attention_mask=mask, use_cache=False)

        def extract(out: Path) -> Any:
            return neuronmap.extract(loaded, prompts, layers=layers, pooling="none", format="hdf5", out=out,
                                     overwrite=True, batch_size=B, max_length=M)

        # warm-up, and the arrays every other measurement writes
        warm = extract(scratch / f"pt-{label}-warm")
        forward_only()
        names = warm.layers
        arrays = {name: warm.array(name) for name in names}
        payload = int(sum(a.nbytes for a in arrays.values()))
        shard_plan = []  # one entry per shard index: all layers, committed together as extract does
        for shard in warm.shards(names[0]):
            rows = slice(*shard.rows)
            shard_plan.append((shard.index, shard.rows, shard.samples, {name: arrays[name][rows] for name in names},
                               warm.sample_ids(names[0], shard.rows), warm.token_index(names[0], shard.rows)))
        manifest = warm.manifest.model_copy(deep=True, update={"shards": [], "status": "running"})
        file_bytes = int(sum(s.bytes for n in names for s in warm.shards(n)))
        shutil.rmtree(scratch / f"pt-{label}-warm", ignore_errors=True)

        t_extract, t_forward, t_raw, t_store = [], [], [], []
        for r in range(repeats):
            out = scratch / f"pt-{label}-r{r}"
            gc.collect()
            start = time.perf_counter()
            extract(out)
            t_extract.append(time.perf_counter() - start)
            shutil.rmtree(out, ignore_errors=True)

            start = time.perf_counter()
            forward_only()
            t_forward.append(time.perf_counter() - start)

        # raw write vs NeuronMap's store alone: cheap, so alternated more often (disk speed drifts)
        for r in range(write_repeats):
            raw = scratch / f"pt-{label}-raw{r}"
            raw.mkdir()
            start = time.perf_counter()
            for i, name in enumerate(names):
                fsync_write(raw / f"{i}.bin", arrays[name])
            t_raw.append(time.perf_counter() - start)
            shutil.rmtree(raw, ignore_errors=True)

            store = scratch / f"pt-{label}-store{r}"
            start = time.perf_counter()
            writer = RunWriter(store, manifest)
            for index, rows, samples, layer_arrays, sample_ids, token_index in shard_plan:
                writer.write_shards(index, rows=rows, samples=samples, arrays=layer_arrays,
                                    sample_ids=sample_ids, token_index=token_index)
            t_store.append(time.perf_counter() - start)
            shutil.rmtree(store, ignore_errors=True)

        med = {k: statistics.median(v) for k, v in
               dict(extract=t_extract, forward=t_forward, raw=t_raw, store=t_store).items()}
        mb = payload / 1e6
        overhead = med["extract"] - med["forward"]
        row = dict(
            model=label, layers=layers, n_prompts=len(prompts), n_tokens=int(lengths.sum()), activation_bytes=payload,
            shard_file_bytes=file_bytes, times=dict(extract=t_extract, forward_only=t_forward, raw_write=t_raw,
                                                     store_only=t_store), median_s=med,
            mb_s=dict(extract=mb / med["extract"], raw=mb / med["raw"], store=mb / med["store"],
                      extract_minus_forward=mb / overhead if overhead > 0 else float("inf")),
        )
        row["ratio"] = dict(incl_forward=row["mb_s"]["extract"] / row["mb_s"]["raw"],
                            extract_minus_forward=row["mb_s"]["extract_minus_forward"] / row["mb_s"]["raw"],
                            store_only=row["mb_s"]["store"] / row["mb_s"]["raw"])
        log(f"  per-token {label}: {mb:.1f} MB, extract {med['extract']:.2f} s (forward alone {med['forward']:.2f} s), "
            f"store {med['store']:.3f} s, raw {med['raw']:.3f} s")
        del loaded, base
        gc.collect()
        return row

    results["gpt2-small"] = measure(big, PER_TOKEN_LAYERS, PER_TOKEN_LAST_BLOCK, frame, "gpt2-small")
    tiny_prompts = cycled_prompts(1000 if args.quick else 8000)
    results["tiny-gpt2"] = measure(tiny, "blocks.*", 2, tiny_prompts, "tiny-gpt2")
    return results


# ---------------------------------------------------------------------------------------------
# peak RSS

def write_prompt_file(n: int, path: Path) -> Path:
    """The shipped prompts cycled to `n`, as JSONL with their labels, written a line at a time (this
    process stays small: see rss_bench)."""
    import csv

    from neuronmap.prompts import DEFAULT_PROMPTS

    with open(DEFAULT_PROMPTS, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps(rows[i % len(rows)]) + "\n")
    return path


def rss_child(n: int, tiny: Path, threads: int, batch_size: int, max_length: int, prompt_file: Path | None) -> None:
    import torch

    torch.set_num_threads(threads)
    quiet_libraries()
    import neuronmap

    prompts = prompt_file if prompt_file is not None else cycled_prompts(n)
    loaded = neuronmap.load_model(tiny, device="cpu")
    with tempfile.TemporaryDirectory(prefix="nm-rss-") as tmp:
        start = time.perf_counter()
        run = neuronmap.extract(loaded, prompts, layers="blocks.*", pooling="mean", format="hdf5",
                                out=Path(tmp) / "run", batch_size=batch_size, max_length=max_length)
        elapsed = time.perf_counter() - start
        rows = run.n_rows("blocks.0")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps(dict(n=n, rows=rows, peak_rss_mib=peak_kib / 1024, vm_hwm_mib=_vm_hwm_mib(), seconds=elapsed)))


def _vm_hwm_mib() -> float | None:
    """VmHWM of /proc/self/status: the peak RSS of this process image alone (Linux), a cross-check."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def rss_bench(args: argparse.Namespace, tiny: Path, scratch: Path, log: Callable[[str], None]) -> dict:
    """Each size in fresh subprocesses, alternating sizes; the ratio uses the median peak of each size."""
    out: dict[str, dict] = {}
    files = {n: write_prompt_file(n, scratch / f"prompts-{n}.jsonl") for n in args.rss_sizes} \
        if args.rss_source == "file" else {}
    for repeat in range(args.rss_repeats):
        for n in args.rss_sizes:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(n), "--tiny-path", str(tiny),
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length)]
            if n in files:
                cmd += ["--prompt-file", str(files[n])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"--rss-child {n} failed: {proc.stderr.strip().splitlines()[-1:]}")
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            entry = out.setdefault(str(n), dict(n=n, rows=record["rows"], peak_rss_mib_runs=[], vm_hwm_mib_runs=[],
                                                seconds_runs=[]))
            entry["peak_rss_mib_runs"].append(record["peak_rss_mib"])
            entry["vm_hwm_mib_runs"].append(record["vm_hwm_mib"])
            entry["seconds_runs"].append(record["seconds"])
            log(f"  {n:,} prompts: peak RSS {record['peak_rss_mib']:.0f} MiB ({record['seconds']:.1f} s extract)")
    for entry in out.values():
        entry["peak_rss_mib"] = statistics.median(entry["peak_rss_mib_runs"])
        hwm = [v for v in entry["vm_hwm_mib_runs"] if v is not None]
        entry["vm_hwm_mib"] = statistics.median(hwm) if hwm else None
        entry["seconds"] = statistics.median(entry["seconds_runs"])
    small, large = (out[str(n)]["peak_rss_mib"] for n in args.rss_sizes)
    return dict(model="tiny-gpt2 (make_tiny, 3 blocks, d=64)", layers="blocks.*", pooling="mean", format="hdf5",
                prompts="JSONL file" if files else "DataFrame built in the child", runs=out, ratio=large / small, parent_rss_mib_at_spawn=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ---------------------------------------------------------------------------------------------
# report

def environment(args: argparse.Namespace) -> dict:
    import h5py
    import pyarrow
    import torch
    import transformers

    import neuronmap

    return dict(
        python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
        cpu=_cpu_name(), torch_threads=args.threads, torch=torch.__version__, transformers=transformers.__version__,
        h5py=h5py.__version__, pyarrow=pyarrow.__version__, numpy=np.__version__, neuronmap=neuronmap.__version__,
        transformer_lens=_dist_version("transformer-lens"), nnsight=_dist_version("nnsight"),
        git=_git_state(),
    )


def _git_state() -> str:
    import neuronmap

    tree = Path(neuronmap.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "neuronmap"], cwd=tree, capture_output=True,
                               text=True, check=True).stdout.strip()
        return f"{tree} @ {head}" + (" + uncommitted changes in neuronmap/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def report(console: Any, results: dict) -> None:
    from rich.table import Table

    tp = results["throughput"]
    limit = next((c for c in tp["contenders"] if c["name"] == "limit"), None)
    nm = {c["name"]: c for c in tp["contenders"] if c["name"].startswith("neuronmap") and c.get("median_s")}
    table = Table(title=f"Throughput: {tp['n_prompts']} shipped prompts, GPT-2-small shape, blocks.* mean-pooled "
                        f"(batch {tp['batch_size']}, {results['environment']['torch_threads']} threads, "
                        f"median of {tp['repeats']})")
    for col in ("contender", "prompts/s", "median s", "all runs s", "vs limit", "NM hdf5 / parquet faster by",
                "target"):
        table.add_column(col, justify="left" if col in ("contender", "target") else "right")
    for c in tp["contenders"]:
        if c.get("error"):
            table.add_row(c["name"], "-", "-", "-", "-", "-", f"[red]failed: {c['error'][:60]}")
            continue
        vs_limit = f"{limit['median_s'] / c['median_s']:.3f}" if limit else "-"
        speedup, target = "-", ""
        if c["name"].startswith("neuronmap"):
            ok = c["ratio_to_limit"] >= 0.95
            target = f"[{'green' if ok else 'red'}]>= 0.95 of limit: {'met' if ok else 'NOT met'}"
        elif c["name"] != "limit" and nm:
            speeds = [c["median_s"] / n["median_s"] for n in nm.values()]
            speedup = " / ".join(f"{s:.2f}x" for s in speeds)
            if c.get("ratio_target"):
                ok = min(speeds) >= c["ratio_target"]
                target = f"[{'green' if ok else 'red'}]>= {c['ratio_target']}x: {'met' if ok else 'NOT met'}"
        table.add_row(c["name"], f"{c['prompts_per_s']:.1f}", f"{c['median_s']:.2f}",
                      " ".join(f"{t:.2f}" for t in c["times"]), vs_limit, speedup, target)
    console.print(table)
    console.print(f"real tokens {tp['real_tokens']:,}; padded tokens: length-sorted {tp['padded_tokens_sorted']:,}, "
                  f"prompt order {tp['padded_tokens_unsorted']:,}")

    checks = Table(title=f"Same numbers? max |x - neuronmap(hdf5)| over mean-pooled blocks (atol {ATOL})")
    for col in ("contender", "blocks", "max abs diff", "ok", "note"):
        checks.add_column(col)
    for c in results["checks"]:
        checks.add_row(c["contender"], c["blocks"], f"{c['max_abs_diff']:.2e}",
                       "[green]yes" if c["ok"] else "[red]NO", c["note"])
    console.print(checks)

    pt = results["per_token"]
    table = Table(title="Per-token capture (pooling='none', hdf5): MB/s of activation bytes vs raw tofile+fsync")
    for col in ("model / layers", "MB", "extract MB/s", "raw MB/s", "ratio incl. forward",
                "ratio extract - forward", "store-only MB/s", "ratio store-only"):
        table.add_column(col, justify="left" if col == "model / layers" else "right")
    for row in pt.values():
        table.add_row(f"{row['model']} {row['layers']} ({row['n_tokens']:,} tokens)", f"{row['activation_bytes'] / 1e6:.1f}",
                      f"{row['mb_s']['extract']:.1f}", f"{row['mb_s']['raw']:.1f}", f"{row['ratio']['incl_forward']:.3f}",
                      f"{row['ratio']['extract_minus_forward']:.3f}", f"{row['mb_s']['store']:.1f}",
                      f"{row['ratio']['store_only']:.3f}")
    console.print(table)

    rss = results["rss"]
    table = Table(title=f"Peak RSS, {rss['model']}, {rss['layers']} mean-pooled, one subprocess per run")
    for col in ("prompts", "peak RSS MiB (ru_maxrss, median)", "runs", "VmHWM MiB", "extract s"):
        table.add_column(col, justify="right")
    for n, r in rss["runs"].items():
        hwm = f"{r['vm_hwm_mib']:.0f}" if r.get("vm_hwm_mib") else "-"
        table.add_row(f"{int(n):,}", f"{r['peak_rss_mib']:.0f}", " ".join(f"{v:.0f}" for v in r["peak_rss_mib_runs"]),
                      hwm, f"{r['seconds']:.1f}")
    console.print(table)
    ok = rss["ratio"] <= 1.1
    console.print(f"RSS ratio large/small = {rss['ratio']:.3f}  [{'green' if ok else 'red'}](target <= 1.1: "
                  f"{'met' if ok else 'NOT met'})")
    console.print(f"total wall time {results['wall_s']:.0f} s; results in {results['out']}")


def markdown(results: dict) -> str:
    """The result tables as Markdown, for BENCHMARKS.md."""
    tp, env = results["throughput"], results["environment"]
    limit = next((c for c in tp["contenders"] if c["name"] == "limit" and c.get("median_s")), None)
    nm = [c for c in tp["contenders"] if c["name"].startswith("neuronmap") and c.get("median_s")]
    lines = [f"Throughput: {tp['n_prompts']} prompts, {tp['real_tokens']:,} real tokens (padded: "
             f"{tp['padded_tokens_sorted']:,} length-sorted, {tp['padded_tokens_unsorted']:,} in prompt order), "
             f"batch {tp['batch_size']}, max_length {tp['max_length']}, {env['torch_threads']} torch threads, "
             f"median of {tp['repeats']}.", "",
             "| contender | prompts/s | median s | runs s | CPU s per wall s | vs limit | NeuronMap hdf5 / parquet faster by |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for c in tp["contenders"]:
        if not c.get("median_s"):
            lines.append(f"| {c['name']} | failed: {c.get('error')} | | | | | |")
            continue
        faster = "-"
        if c["name"] != "limit" and not c["name"].startswith("neuronmap") and nm:
            faster = " / ".join(f"{c['median_s'] / n['median_s']:.2f}x" for n in nm)
        vs = f"{limit['median_s'] / c['median_s']:.3f}" if limit else "-"
        cpu = " ".join(f"{v:.2f}" for v in c.get("info", {}).get("cpu_per_wall", []))
        lines.append(f"| {c['name']} | {c['prompts_per_s']:.1f} | {c['median_s']:.2f} | "
                     f"{' '.join(f'{t:.2f}' for t in c['times'])} | {cpu} | {vs} | {faster} |")
    lines += ["", "| same numbers? | blocks | max abs diff vs neuronmap (hdf5) | within 1e-4 |", "| --- | --- | ---: | --- |"]
    for c in results["checks"]:
        lines.append(f"| {c['contender']} | {c['blocks']} | {c['max_abs_diff']:.1e} | {'yes' if c['ok'] else 'NO'} |")
    lines += ["", "| per-token capture (hdf5) | activation MB | extract MB/s | raw write MB/s | ratio incl. forward | "
              "forward alone s | ratio extract minus forward | store-only MB/s | ratio store-only |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["per_token"].values():
        lines.append(f"| {row['model']} `{row['layers']}`, {row['n_prompts']:,} prompts, {row['n_tokens']:,} tokens | "
                     f"{row['activation_bytes'] / 1e6:.1f} | {row['mb_s']['extract']:.1f} | {row['mb_s']['raw']:.0f} | "
                     f"{row['ratio']['incl_forward']:.3f} | {row['median_s']['forward']:.2f} | "
                     f"{row['ratio']['extract_minus_forward']:.3f} | {row['mb_s']['store']:.0f} | "
                     f"{row['ratio']['store_only']:.3f} |")
    rss = results["rss"]
    lines += ["", "| peak RSS, " + rss["model"] + " | ru_maxrss MiB (median) | runs | VmHWM MiB |", "| ---: | ---: | --- | ---: |"]
    for n, r in rss["runs"].items():
        lines.append(f"| {int(n):,} prompts | {r['peak_rss_mib']:.0f} | "
                     f"{' '.join(f'{v:.0f}' for v in r['peak_rss_mib_runs'])} | {r['vm_hwm_mib'] or 0:.0f} |")
    lines += ["", f"RSS ratio {rss['ratio']:.3f}. Total wall time {results['wall_s']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown_from is not None:
        print(markdown(json.loads(args.markdown_from.read_text())))
        return 0
    if args.rss_child is not None:
        rss_child(args.rss_child, args.tiny_path, args.threads, args.batch_size, args.max_length, args.prompt_file)
        return 0
    if args.make_tiny is not None:
        quiet_libraries()
        from neuronmap.models.tiny import make_tiny

        make_tiny("gpt2", args.make_tiny, seed=0)
        return 0

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    log = console.print
    wall = time.perf_counter()
    load_at_start = os.getloadavg()
    if load_at_start[0] > 0.5:
        log(f"[yellow]load average {load_at_start[0]:.2f} at start: other work on this machine will distort the timings")

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nm-bench-")))
        else:
            scratch = args.workdir
            scratch.mkdir(parents=True, exist_ok=True)
        # Peak RSS first, while this process is small: on Linux a child's ru_maxrss starts from the
        # RSS of the process that spawned it, so the tiny model is built in a subprocess too and
        # torch is not imported here yet.
        tiny = scratch / "models" / "tiny-gpt2"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-tiny", str(tiny)], check=True)
        log(f"[bold]peak RSS (subprocesses, parent RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB) ...")
        rss = rss_bench(args, tiny, scratch, log)
        if args.rss_only:
            log(f"peak RSS ratio {rss['ratio']:.3f}: " + json.dumps(rss["runs"]))
            return 0

        import torch

        torch.set_num_threads(args.threads)
        quiet_libraries()
        env = environment(args)
        env["load_average_at_start"] = load_at_start
        log("[bold]building the GPT-2-small-shaped random model ...")
        big = build_big_model(scratch / "models", tiny)
        frame = shipped_prompts(args.stride)
        texts = frame["text"].tolist()
        tokenizer = fresh_tokenizer(big)
        _, lengths = token_lengths(tokenizer, texts, args.max_length)

        log(f"[bold]throughput: {len(frame)} prompts (every {args.stride}. of the shipped set), "
            f"{args.repeats} repeat(s), {args.threads} threads")
        contenders = make_contenders(args, big, args.skip_peers, log)
        time_contenders(contenders, frame, args, scratch / "runs", log)
        checks = check_numbers(contenders)
        limit_median = next((statistics.median(c.times) for c in contenders if c.name == "limit" and c.times), None)
        rows = []
        for c in contenders:
            row: dict[str, Any] = dict(name=c.name, what=c.what, ratio_target=c.ratio_target, times=c.times,
                                       error=c.error, info=c.info)
            if c.times:
                row["median_s"] = statistics.median(c.times)
                row["prompts_per_s"] = len(frame) / row["median_s"]
                if limit_median:
                    row["ratio_to_limit"] = limit_median / row["median_s"]
            rows.append(row)
        del contenders
        gc.collect()

        log("[bold]per-token capture ...")
        per_token = per_token_bench(args, big, tiny, frame, scratch / "per-token", log)
        env["load_average_at_end"] = os.getloadavg()

    results = dict(
        command=" ".join([".venv/bin/python", "benchmarks/extraction.py", *(argv if argv is not None else sys.argv[1:])]),
        mode="quick" if args.quick else "full", environment=env,
        throughput=dict(n_prompts=len(frame), stride=args.stride, batch_size=args.batch_size,
                        max_length=args.max_length, repeats=args.repeats, real_tokens=int(lengths.sum()),
                        padded_tokens_sorted=padded_tokens(lengths, args.batch_size, True),
                        padded_tokens_unsorted=padded_tokens(lengths, args.batch_size, False), contenders=rows),
        checks=checks, per_token=per_token, rss=rss, wall_s=time.perf_counter() - wall, out=str(args.out),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    report(console, results)
    failed = [c["contender"] for c in checks if not c["ok"]]
    if failed:
        console.print(f"[red]numbers differ from NeuronMap's for: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
