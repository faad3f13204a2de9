"""`neuronmap doctor`: what a bug report needs, gathered without side effects.

Checks are cheap and never start anything: Ray reachability is a TCP connect to the address a local
`ray start` records (or RAY_ADDRESS), not a `ray.init`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
from pathlib import Path
from typing import Any

PACKAGES = ("neuronmap", "torch", "transformers", "tokenizers", "h5py", "pyarrow", "numpy", "ray")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda x{len(names)} ({', '.join(names)})"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return f"cpu ({os.cpu_count()} cores)"


def ray_address() -> str | None:
    """The Ray GCS address a client would join: RAY_ADDRESS, else the local `ray start` record."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    record = Path("/tmp/ray/ray_current_cluster")
    if record.exists():
        text = record.read_text().strip()
        return text or None
    return None


def _reachable(address: str, timeout: float = 1.0) -> bool:
    target = address.split("://")[-1]
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def collect(path: str | Path = ".") -> dict[str, Any]:
    """Versions, Python, device, memory, free disk at `path`, Ray and Hugging Face hub reachability."""
    import psutil

    info: dict[str, Any] = {f"{name} version": _version(name) for name in PACKAGES}
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    info["device"] = _device()
    info["memory"] = f"{psutil.virtual_memory().available / 1e9:.1f} GB free of {psutil.virtual_memory().total / 1e9:.1f} GB"
    info["disk free"] = f"{shutil.disk_usage(Path(path).resolve()).free / 1e9:.1f} GB at {Path(path).resolve()}"
    address = ray_address()
    if address is None:
        info["ray cluster"] = "none found (an embedded local Ray starts when needed)"
    else:
        info["ray cluster"] = f"{address} ({'reachable' if _reachable(address) else 'not reachable'})"
    info["hf offline"] = os.environ.get("HF_HUB_OFFLINE", "0")
    from .models.loading import hub_unreachable

    unreachable = hub_unreachable()
    info["hugging face hub"] = (f"unreachable ({unreachable}): hub ids load from the local cache only"
                                if unreachable else "reachable")
    return info
