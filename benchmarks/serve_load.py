#!/usr/bin/env python
"""Serve load benchmark: /v1/extract under 1, 8 and 32 concurrent clients, batching on and off.

What is measured (numbers and the exact command in benchmarks/BENCHMARKS.md, "Serve"):

- One embedded Ray cluster on 127.0.0.1 and one Serve HTTP proxy on a free loopback port; two copies of
  the NeuronMap app (`deployments.app.build_app`) serving the tiny GPT-2 (`make_tiny("gpt2")`), one
  with dynamic batching (the ingress merges concurrent requests with `@serve.batch`, `--max-batch-size`,
  `--batch-wait-ms`, and sends each batch as one call to the model replica) at `/batched`, one with a
  model call per request at `/unbatched`. Each has one model replica (1 CPU) and one ingress replica.
- Clients are asyncio tasks sharing one `httpx.AsyncClient` in this process; each sends
  `POST /v1/extract {"texts": [one prompt], "layers": "blocks.*", "pooling": "mean"}` (JSON answer),
  waits for the answer and sends the next, for `--duration` seconds per phase (capped at
  `--max-requests`). Prompts cycle through the shipped prompt set. A short warm-up precedes each phase.
- Per phase: requests/s, p50 and p99 latency (ms), errors (any non-200 or transport error), the mean
  model batch size from the server's /metrics (`neuronmap_serve_batch_requests`), and where the CPU
  went: CPU time (user + system, from /proc through psutil) of every process of the Ray session over
  the recorded window, per request, grouped as client (this process), HTTP proxy, ingress replica,
  model replica and the rest of Ray (GCS, raylet, controller, the other app). On a machine whose CPUs
  are all busy, throughput is about (CPUs we get) / (CPU per request), so this is the profile that
  says which part to make cheaper.
- Phases: batching on at each `--clients` count but the largest; then `--rounds` alternating pairs
  (on, off) at the largest count, so a machine whose load drifts affects both sides alike; the report
  gives the median of the rounds on each side and their throughput ratio (`--unbatched-all`: batching
  off at the smaller counts too).
- `--py-spy DIR`: during the first round at the largest count, py-spy samples the proxy, ingress and
  model replica of the app under load (raw stacks in DIR) and the report sorts each one's samples
  into what they were doing (`STACK_CATEGORIES`: forward, prepare, the handle call, our HTTP app,
  Serve's request machinery, event loops).
- Without Serve, in this process: the FastAPI app of the ingress (`http.create_app`, the Guard, body
  validation, routing, JSON encoding) answering a `/v1/extract` request from a precomputed answer,
  driven by raw ASGI calls (microseconds per request), and the JSON encoding alone; and the model
  side: the same `ExtractionService` on one torch thread, 32 one-prompt requests answered as one
  batch (`answer`, what a batched model call does) against 32 separate calls: best of 5, ms per
  request and their ratio. That is the most batching can save inside the model replica.

Loopback only, bounded in time ((clients - 1 + 2 x rounds) phases of duration + warm-up) and in requests.

Usage::

    .venv/bin/python benchmarks/serve_load.py                       # 30 s per phase (the issue's setting)
    .venv/bin/python benchmarks/serve_load.py --duration 8          # short run on a busy machine
    .venv/bin/python benchmarks/serve_load.py --duration 8 --py-spy /tmp/serve-stacks
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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

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
                warmup: float, probe: Callable[[], dict] | None = None) -> dict:
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
        before = probe() if probe else None
        started = time.perf_counter()
        await asyncio.gather(*(worker(k, started + duration, True) for k in range(clients)))
        elapsed = time.perf_counter() - started
        after = probe() if probe else None
    ms = np.asarray(latencies) * 1000
    row = {"clients": clients, "requests": len(latencies), "seconds": round(elapsed, 2),
           "throughput_rps": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
           "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": int(errors)}
    if probe:
        row["cpu_windows"] = (before, after)
    return row


# -- where the CPU goes ----------------------------------------------------------------------------
def session_processes() -> dict[int, tuple[str, float]]:
    """{pid: (label, CPU seconds)} of this process and every process it started (the Ray session).

    Ray's workers set their process title to ``ray::<actor class>``; Serve replicas read
    ``ray::ServeReplica:<app>:<deployment>``, the HTTP proxy ``ray::ProxyActor``.
    """
    import psutil

    me = psutil.Process()
    found = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            title = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            continue
        label = "client" if proc.pid == me.pid else (title.split()[0] if title.startswith("ray::") else proc.name())
        found[proc.pid] = (label, times.user + times.system)
    return found


ROLES = ("client", "HTTP proxy", "ingress replica", "model replica", "rest of Ray")


def role(label: str, app: str) -> str:
    if label == "client":
        return "client"
    if label == "ray::ProxyActor":
        return "HTTP proxy"
    if label == f"ray::ServeReplica:{app}:NeuronMapIngress":
        return "ingress replica"
    if label.startswith(f"ray::ServeReplica:{app}:model-"):
        return "model replica"
    return "rest of Ray"


def cpu_per_request(before: dict, after: dict, app: str, requests: int, seconds: float) -> dict:
    """CPU ms per request by role over a window, and the CPUs the whole session used on average."""
    spent = Counter()
    for pid, (label, total) in after.items():
        spent[role(label, app)] += total - before.get(pid, (label, 0.0))[1]
    per_request = {name: round(spent[name] / max(requests, 1) * 1000, 2) for name in ROLES}
    per_request["total"] = round(sum(spent.values()) / max(requests, 1) * 1000, 2)
    return {"cpu_ms_per_request": per_request, "cpus_used": round(sum(spent.values()) / seconds, 2)}


def py_spy_start(app: str, seconds: float, out_dir: Path) -> list[subprocess.Popen]:
    """py-spy on the proxy, ingress and model replica of `app` (raw stacks, full file names)."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(binary).exists():
        raise SystemExit("--py-spy needs py-spy (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for pid, (label, _) in session_processes().items():
        name = role(label, app)
        if name in ("HTTP proxy", "ingress replica", "model replica"):
            out = out_dir / f"{app}-{name.replace(' ', '-')}.txt"
            spies.append(subprocess.Popen([binary, "record", "--rate", "50", "--format", "raw", "--full-filenames",
                                           "--nonblocking", "--duration", str(int(seconds)), "--output", str(out),
                                           "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


# What a sampled stack was doing: the first category (in this order) one of its frames matches.
STACK_CATEGORIES = (
    ("forward (torch, transformers)", ("/site-packages/torch/", "/site-packages/transformers/")),
    ("prepare (validate, tokenise)", ("ExtractionService.prepare ",)),
    ("rest of the extraction (neuronmap, extractor.py)", ("/neuronmap/", "/deployments/extractor.py")),
    ("handle call to the model (ingress side)", ("HandleExtractor.",)),
    ("model replica entry (ModelServer, to_thread)", ("ModelServer.",)),
    ("our HTTP app (FastAPI, Guard, encoding)", ("/site-packages/fastapi/", "/site-packages/starlette/",
                                                 "/deployments/")),
    ("Serve and Ray request machinery", ("/site-packages/ray/", "/site-packages/uvicorn/")),
)
OTHER_CATEGORY = "threads and event loops (standard library frames only)"


def stack_shares(raw: Path) -> dict:
    """Share of py-spy samples per STACK_CATEGORIES entry (a sample counts once, for its first match)."""
    counts, total = Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        category = next((name for name, marks in STACK_CATEGORIES if any(mark in stack for mark in marks)),
                        OTHER_CATEGORY)
        counts[category] += int(number)
        total += int(number)
    return {"samples": total, "shares": {k: round(v / total, 3) for k, v in counts.most_common()} if total else {}}


# -- without Serve -----------------------------------------------------------------------------------
def app_side(model: str, texts: list[str], n: int = 2000) -> dict:
    """µs per /v1/extract request through the ingress's FastAPI app alone, and for the JSON encoding alone.

    The extractor hands back a precomputed answer for the tiny GPT-2 (one text, `blocks.*`, mean), so
    what is timed is everything the ingress itself does per request: the Guard, body validation,
    routing, metrics, the audit line and the response encoding.
    """
    import logging

    from deployments import encoding
    from deployments.analysis_jobs import JobManager
    from deployments.api import LocalJobs, NeuronMapAPI
    from deployments.extractor import ExtractionService
    from deployments.http import create_app
    from deployments.settings import ServeSettings

    outcome = ExtractionService.load(model, device="cpu").extract(texts[:1], "blocks.*", "mean")

    class Answer:
        async def __call__(self, *args: object) -> object:
            return outcome

    settings = ServeSettings(runs_dir=tempfile.gettempdir(), models=["tiny"])
    jobs = JobManager()
    app = create_app(NeuronMapAPI(settings, {"tiny": Answer()}, LocalJobs(jobs)))
    audit = logging.getLogger("neuronmap.serve.audit")
    audit.addHandler(logging.NullHandler())
    audit.propagate = False
    body = json.dumps({"model": "tiny", "texts": texts[:1], "layers": "blocks.*", "pooling": "mean"}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/extract", "raw_path": b"/v1/extract", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def one() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status = []

        async def receive() -> dict:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(dict(scope), receive, send)
        if status != [200]:
            raise RuntimeError(f"in-process app answered {status}")

    async def loop(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            await one()
        return time.perf_counter() - start

    asyncio.run(loop(100))
    app_us = min(asyncio.run(loop(n)) for _ in range(3)) / n * 1e6
    start = time.perf_counter()
    for _ in range(n):
        encoding.encode_json("tiny", "mean", "float32", outcome)
    encode_us = (time.perf_counter() - start) / n * 1e6
    jobs.shutdown()
    return {"app_us_per_request": round(app_us, 1), "json_encode_us": round(encode_us, 1)}



def model_side(model: str, texts: list[str], n: int = 32, repeats: int = 5) -> dict:
    """ms per request of n single-prompt requests: one batch vs n separate calls (1 torch thread).

    Each call validates, tokenises and extracts (`ExtractionService.answer`), as a model replica does.
    """
    import torch

    from deployments.extractor import ExtractionService
    from deployments.schemas import ExtractCall

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        service = ExtractionService.load(model, device="cpu")
        calls = [ExtractCall([texts[i % len(texts)]], "blocks.*", "mean", "float32") for i in range(n)]
        service.answer(calls)

        def best(fn) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times) / n * 1000

        merged = best(lambda: service.answer(calls))
        separate = best(lambda: [service.answer([call]) for call in calls])
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
    results, spied = [], set()
    for name, clients in plan:
        url = f"{base}/{name}"
        spies = []
        if args.py_spy and clients == top and name not in spied:
            spied.add(name)
            spies = py_spy_start(name, args.warmup + args.duration, args.py_spy)
        before = batch_counts(url)
        row = asyncio.run(phase(url, "tiny", texts, clients, args.duration, args.max_requests, args.warmup,
                                probe=session_processes))
        after = batch_counts(url)
        for spy in spies:
            spy.wait(timeout=120)
        batches = after[1] - before[1]
        row["batching"] = name == "batched"
        row["mean_batch_requests"] = round((after[0] - before[0]) / batches, 2) if batches else None
        row.update(cpu_per_request(*row.pop("cpu_windows"), name, row["requests"], row["seconds"]))
        if spies:
            row["py_spy"] = {path.stem: stack_shares(path) for path in sorted(args.py_spy.glob(f"{name}-*.txt"))}
        results.append(row)
        cpu = row["cpu_ms_per_request"]
        print(f"{name:>9} clients={clients:>3}  {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:7.1f} ms"
              f"  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}  mean batch {row['mean_batch_requests']}"
              f"  CPU ms/req {cpu['total']} (proxy {cpu['HTTP proxy']}, ingress {cpu['ingress replica']}, "
              f"model {cpu['model replica']}, client {cpu['client']}, rest {cpu['rest of Ray']}; "
              f"{row['cpus_used']} CPUs busy)", flush=True)
    return results


def medians_of(rows: list[dict]) -> dict:
    out = {key: float(np.median([r[key] for r in rows])) for key in ("throughput_rps", "p50_ms", "p99_ms")}
    out["errors"] = int(sum(r["errors"] for r in rows))
    out["cpu_ms_per_request"] = {name: round(float(np.median([r["cpu_ms_per_request"][name] for r in rows])), 2)
                                 for name in (*ROLES, "total")}
    out["mean_batch_requests"] = float(np.median([r["mean_batch_requests"] or 0 for r in rows]))
    return out


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
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="sample the proxy, ingress and model replica with py-spy in the first round at the "
                             "largest count (raw stacks in DIR)")
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
        app = app_side(model, texts)
    print(f"model side, {side['requests']} one-prompt requests: one batch {side['merged_ms_per_request']} ms/req, "
          f"separate {side['separate_ms_per_request']} ms/req ({side['ratio']}x)")
    print(f"ingress app alone (no Serve): {app['app_us_per_request']} us/request, of which JSON encoding "
          f"{app['json_encode_us']} us")
    top = counts[-1]
    medians = {batching: medians_of([r for r in results if r["batching"] is batching and r["clients"] == top])
               for batching in (True, False)}
    ratio = round(medians[True]["throughput_rps"] / medians[False]["throughput_rps"], 2) \
        if medians[False]["throughput_rps"] else None
    cpu_ratio = round(medians[False]["cpu_ms_per_request"]["total"] / medians[True]["cpu_ms_per_request"]["total"], 2)
    print(f"batching on/off at {top} clients (median of {args.rounds} rounds): {ratio}x throughput, "
          f"{cpu_ratio}x less CPU per request")
    report = {"command": " ".join(["python", *sys.argv]), "duration_s": args.duration, "rounds": args.rounds,
              "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
              "model": "tiny GPT-2" if args.model is None else args.model, "cpus": os.cpu_count(),
              "python": platform.python_version(), "load_average_after": os.getloadavg(), "results": results,
              "medians_at_max_clients": {"batched": medians[True], "unbatched": medians[False]},
              "batching_ratio_at_max_clients": ratio, "cpu_per_request_ratio_at_max_clients": cpu_ratio,
              "model_side": side, "app_side": app}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
