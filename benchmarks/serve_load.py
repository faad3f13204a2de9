#!/usr/bin/env python
"""Serve load benchmark: /v1/extract under 1, 8 and 32 concurrent clients, batching on and off.

What is measured (numbers and the exact command in benchmarks/BENCHMARKS.md, "Serve"):

- One embedded Ray cluster on 127.0.0.1 and one Serve HTTP proxy on a free loopback port; two copies of
  the NeuronMap app (`deployments.app.build_app`) serving the tiny GPT-2 (`make_tiny("gpt2")`), one
  with dynamic batching (`@serve.batch`, `--max-batch-size`, `--batch-wait-ms`) at `/batched`, one with
  a model call per request at `/unbatched`. Each has one model replica (1 CPU) and one ingress replica.
- Clients are asyncio tasks sharing one `httpx.AsyncClient` in this process; each sends
  `POST /v1/extract {"texts": [one prompt], "layers": "blocks.*", "pooling": "mean"}` (JSON answer),
  waits for the answer and sends the next, for `--duration` seconds per phase (capped at
  `--max-requests`). Prompts cycle through the shipped prompt set. A short warm-up precedes each phase.
- Per phase: requests/s, p50 and p99 latency (ms), errors (any non-200 or transport error), and the
  mean model batch size from the server's /metrics (`neuronmap_serve_batch_requests`).
- Phases: batching on at each `--clients` count but the largest; then `--rounds` alternating pairs
  (on, off) at the largest count, so a machine whose load drifts affects both sides alike; the report
  gives the median of the rounds on each side and their throughput ratio (`--unbatched-all`: batching
  off at the smaller counts too).
- Model side, without Serve: the same `ExtractionService` in this process on one torch thread, 32
  one-prompt requests extracted as one merged batch (what `@serve.batch` hands the replica) against 32
  separate calls: best of 5, ms per request and their ratio. That is the most batching can save; end
  to end, the HTTP proxy, the ingress, the replica and the clients share the same CPUs.

Loopback only, bounded in time ((clients - 1 + 2 x rounds) phases of duration + warm-up) and in requests.

Usage::

    .venv/bin/python benchmarks/serve_load.py                       # 30 s per phase (the issue's setting)
    .venv/bin/python benchmarks/serve_load.py --duration 8          # short run on a busy machine
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import json
import platform
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prompts() -> list[str]:
    from neuronmap.prompts import load_prompts

    return load_prompts(ROOT / "neuronmap" / "data" / "questions.csv")["text"].tolist()


async def phase(url: str, model: str, texts: list[str], clients: int, duration: float, max_requests: int,
                warmup: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def one(i: int) -> tuple[bool, float]:
            body = {"model": model, "texts": [texts[i % len(texts)]], "layers": "blocks.*", "pooling": "mean"}
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/extract", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            return ok, time.perf_counter() - start

        async def worker(index: int, until: float, record: bool) -> None:
            nonlocal errors, sent
            i = index
            while time.perf_counter() < until and sent < max_requests:
                if record:
                    sent += 1
                ok, seconds = await one(i)
                i += clients
                if record:
                    latencies.append(seconds)
                    errors += not ok

        warm_until = time.perf_counter() + warmup
        await asyncio.gather(*(worker(k, warm_until, False) for k in range(clients)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(k, started + duration, True) for k in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": int(errors)}



def model_side(model: str, texts: list[str], n: int = 32, repeats: int = 5) -> dict:
    """ms per request of n single-prompt requests: one merged batch vs n separate calls (1 torch thread)."""
    import torch

    from deployments.extractor import ExtractionService

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        service = ExtractionService.load(model, device="cpu")
        jobs = [service.prepare([texts[i % len(texts)]], "blocks.*", "mean") for i in range(n)]
        service.run(jobs)

        def best(fn) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times) / n * 1000

        merged = best(lambda: service.run(jobs))
        separate = best(lambda: [service.run([job]) for job in jobs])
    finally:
        torch.set_num_threads(before)
    return {"requests": n, "merged_ms_per_request": round(merged, 3), "separate_ms_per_request": round(separate, 3),
            "ratio": round(separate / merged, 2), "forward_batch_size": service.forward_batch_size}


def batch_counts(url: str) -> tuple[float, float]:
    """(sum, count) of the neuronmap_serve_batch_requests histogram in the app's /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = sum(float(v) for v in re.findall(r"^neuronmap_serve_batch_requests_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(r"^neuronmap_serve_batch_requests_count\{[^}]*\} (\S+)$", text, re.M))
    return total, count


def run_phases(base: str, model: str, texts: list[str], args: argparse.Namespace, counts: list[int]) -> list[dict]:
    top = counts[-1]
    plan = [("batched", c) for c in counts[:-1]]
    plan += [("unbatched", c) for c in counts[:-1]] if args.unbatched_all else []
    plan += [(name, top) for _ in range(args.rounds) for name in ("batched", "unbatched")]
    results = []
    for name, clients in plan:
        url = f"{base}/{name}"
        before = batch_counts(url)
        row = asyncio.run(phase(url, "tiny", texts, clients, args.duration, args.max_requests, args.warmup))
        after = batch_counts(url)
        batches = after[1] - before[1]
        row["batching"] = name == "batched"
        row["mean_batch_requests"] = round((after[0] - before[0]) / batches, 2) if batches else None
        results.append(row)
        print(f"{name:>9} clients={clients:>3}  {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:7.1f} ms"
              f"  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}  mean batch {row['mean_batch_requests']}",
              flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase (default 30)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load before each phase")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per phase, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off pairs at the largest count")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap on recorded requests per phase")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--unbatched-all", action="store_true", help="batching off at the smaller counts too")
    parser.add_argument("--model", default=None, help="model to serve (default: a fresh tiny GPT-2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-serve.json")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]

    from actors import options as ray_options

    ray_options.embedded_environment()
    import ray

    from deployments import options
    from deployments.app import build_app

    texts = prompts()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from neuronmap.models.tiny import make_tiny

            model = str(make_tiny("gpt2", Path(tmp) / "tiny-gpt2"))
        with ray_options.quiet_logs():
            ray.init(**ray_options.embedded_init_kwargs(4))
        try:
            port = free_port()
            options.start("127.0.0.1", port)
            base = f"http://127.0.0.1:{port}"
            for name, enabled in (("batched", True), ("unbatched", False)):
                settings = {"runs_dir": tmp, "models": [f"tiny={model}"],
                            "batching": {"enabled": enabled, "max_batch_size": args.max_batch_size,
                                         "batch_wait_timeout_s": args.batch_wait_ms / 1000}}
                options.run(build_app(settings), name=name, route_prefix=f"/{name}")
            results = run_phases(base, model, texts, args, counts)
        finally:
            options.shutdown()
            ray.shutdown()
        side = model_side(model, texts)
    print(f"model side, {side['requests']} one-prompt requests: merged {side['merged_ms_per_request']} ms/req, "
          f"separate {side['separate_ms_per_request']} ms/req ({side['ratio']}x)")
    top = counts[-1]
    medians = {}
    for batching in (True, False):
        rounds = [r for r in results if r["batching"] is batching and r["clients"] == top]
        medians[batching] = {key: float(np.median([r[key] for r in rounds]))
                             for key in ("throughput_rps", "p50_ms", "p99_ms")}
        medians[batching]["errors"] = int(sum(r["errors"] for r in rounds))
    ratio = round(medians[True]["throughput_rps"] / medians[False]["throughput_rps"], 2) \
        if medians[False]["throughput_rps"] else None
    print(f"batching on/off at {top} clients (median of {args.rounds} rounds): {ratio}x throughput")
    report = {"command": " ".join(["python", *sys.argv]), "duration_s": args.duration, "rounds": args.rounds,
              "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
              "model": "tiny GPT-2" if args.model is None else args.model, "cpus": os.cpu_count(),
              "python": platform.python_version(), "load_average_after": os.getloadavg(), "results": results,
              "medians_at_max_clients": {"batched": medians[True], "unbatched": medians[False]},
              "batching_ratio_at_max_clients": ratio, "model_side": side}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
