"""Connecting to Ray and checking that a cluster can run the workers asked for, before scheduling.

`ray_session(address)` is the only place that calls `ray.init`:
- no address: RAY_ADDRESS when it is set (as inside a Ray job), else an embedded single-machine
  cluster bound to 127.0.0.1, quiet, shut down afterwards;
- `auto`: the cluster RAY_ADDRESS or the latest local `ray start` points to (resolved, then probed);
- `HOST:PORT` (GCS) or `ray://HOST:PORT` (Ray Client): that cluster, after a TCP probe, so an
  unreachable address is a one-line ConfigError within seconds instead of Ray's long retry loop.
A process already connected to Ray (a notebook, the test session) keeps its connection.

`check_resources` turns "the actors would stay pending forever" into a ConfigError: GPUs asked for on
a cluster without any, more CPUs per worker than any node has, more workers than fit.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from typing import Iterator

from neuronmap.errors import ConfigError

from . import options

options.setup_environment()


@dataclass(frozen=True)
class Address:
    """A parsed cluster address: kind `auto`, `gcs` (HOST:PORT) or `client` (ray://HOST:PORT)."""

    kind: str
    text: str
    host: str | None = None
    port: int | None = None


def parse_address(address: str) -> Address:
    """Parse `auto`, `HOST:PORT` or `ray://HOST:PORT`; anything else is a ConfigError naming the forms."""
    text = address.strip()
    if text == "auto":
        return Address("auto", text)
    kind, rest = ("client", text[len("ray://"):]) if text.startswith("ray://") else ("gcs", text)
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or "/" in rest:
        raise ConfigError(f"--address {address!r} is not a Ray address; use auto, HOST:PORT (the head's GCS port, "
                          "6379 by default) or ray://HOST:10001, or leave it out for an embedded local cluster")
    return Address(kind, text, host.strip("[]"), int(port))


def probe(address: Address, timeout: float = options.CONNECT_TIMEOUT_S) -> None:
    """TCP-connect to the address; ConfigError within `timeout` seconds when nothing listens there."""
    if address.host is None:
        return
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            return
    except OSError as error:
        reason = error.strerror or type(error).__name__
    raise ConfigError(f"no Ray cluster reachable at {address.text} ({reason} after at most {timeout:.0f} s); start one "
                      "with `ray start --head`, check the host and port, or leave out --address for a local cluster")


def resolve_auto() -> Address:
    """The concrete address `auto` means: RAY_ADDRESS, else the latest `ray start` on this machine."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return parse_address(env)
    found = options.find_local_cluster()
    if not found:
        raise ConfigError("--address auto found no running Ray cluster (RAY_ADDRESS is unset and nothing was started "
                          "with `ray start` here); start one with `ray start --head`, pass HOST:PORT, or leave out "
                          "--address for an embedded local cluster")
    return parse_address(found)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: float = 1.0) -> Iterator[None]:
    """Be connected to Ray for the duration; start (and stop) an embedded cluster when `address` is None.

    num_cpus : logical CPUs the embedded cluster needs at least (workers x CPUs + tokenising)
    """
    if address is None and os.environ.get("RAY_ADDRESS", "").strip():
        address = "auto"  # inside a Ray job (or a shell that exported it): use that cluster
    parsed = parse_address(address) if address is not None else None
    if parsed is not None and parsed.kind == "auto":
        parsed = resolve_auto()
    if parsed is not None:
        probe(parsed)
    else:
        options.embedded_environment()
    import ray

    if ray.is_initialized():
        _check_same_cluster(ray, parsed)
        yield
        return
    with options.quiet_logs():
        try:
            if parsed is None:
                ray.init(**options.embedded_init_kwargs(num_cpus))
            else:
                ray.init(**options.join_init_kwargs(parsed.text))
        except ConnectionError as error:
            raise ConfigError(f"cannot join a Ray cluster at {address}: {' '.join(str(error).split())}; "
                              "start one with `ray start --head` or leave out --address") from None
    try:
        yield
    finally:
        with options.quiet_logs():
            ray.shutdown()


def _check_same_cluster(ray, parsed: Address | None) -> None:
    if parsed is None or parsed.kind != "gcs":
        return
    current = ray.get_runtime_context().gcs_address
    host, _, port = current.rpartition(":")
    same_port = port == str(parsed.port)
    local = {"127.0.0.1", "localhost", socket.gethostname()}
    if not same_port or (parsed.host not in local and parsed.host != host):
        raise ConfigError(f"this process is already connected to the Ray cluster at {current}, not {parsed.text}; "
                          "call ray.shutdown() first or leave out the address")


@dataclass(frozen=True)
class Capacity:
    """What the cluster can run: workers that fit, and its totals (for messages)."""

    max_workers: int
    cpus: float
    gpus: float


def check_resources(workers: int | None, cpus_per_worker: float, gpus_per_worker: float) -> Capacity:
    """ConfigError when the workers asked for can never be scheduled; else how many fit at most.

    One worker needs `cpus_per_worker` CPUs and `gpus_per_worker` GPUs on one node; the tokenising
    tasks need `options.TOKENIZE_CPUS` besides the workers.
    """
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    total_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    if gpus_per_worker > 0 and total_gpus == 0:
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker:g} asks for GPUs but the Ray cluster has none "
                          f"({total_cpus:g} CPUs, 0 GPUs); leave out --gpus-per-worker or join a cluster with GPUs")
    if gpus_per_worker > max((node.get("GPU", 0.0) for node in nodes), default=0.0):
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker:g} is more than any node of the cluster has "
                          f"(largest: {max(node.get('GPU', 0.0) for node in nodes):g}); ask for fewer")
    if cpus_per_worker > max((node.get("CPU", 0.0) for node in nodes), default=0.0):
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker:g} is more than any node of the cluster has "
                          f"(largest: {max((node.get('CPU', 0.0) for node in nodes), default=0.0):g}); ask for fewer")
    fit = []
    for node in nodes:
        spare_cpus = node.get("CPU", 0.0)
        by_cpu = math.floor(spare_cpus / cpus_per_worker + 1e-9) if cpus_per_worker > 0 else 1 << 30
        by_gpu = math.floor(node.get("GPU", 0.0) / gpus_per_worker + 1e-9) if gpus_per_worker > 0 else 1 << 30
        fit.append(min(by_cpu, by_gpu))
    max_workers = sum(fit)
    # Leave room for the tokenising tasks: drop one worker when the workers would take every CPU.
    if cpus_per_worker > 0 and max_workers * cpus_per_worker > total_cpus - options.TOKENIZE_CPUS:
        max_workers = math.floor((total_cpus - options.TOKENIZE_CPUS) / cpus_per_worker + 1e-9)
    max_workers = max(0, max_workers)
    if max_workers == 0:
        raise ConfigError(f"no extraction worker fits the Ray cluster ({total_cpus:g} CPUs, {total_gpus:g} GPUs) with "
                          f"--cpus-per-worker {cpus_per_worker:g} and room for tokenising; lower --cpus-per-worker")
    if workers is not None and workers > max_workers:
        raise ConfigError(f"--workers {workers} do not fit the Ray cluster ({total_cpus:g} CPUs, {total_gpus:g} GPUs): "
                          f"at most {max_workers} with --cpus-per-worker {cpus_per_worker:g}"
                          f"{f' and --gpus-per-worker {gpus_per_worker:g}' if gpus_per_worker else ''}; "
                          "ask for fewer workers or fewer CPUs per worker (e.g. --cpus-per-worker 0.5)")
    return Capacity(max_workers, total_cpus, total_gpus)
