"""CPU, memory, disk and GPU usage for the Jobs and system page.

GPUs come from NVML (the `pynvml` module of nvidia-ml-py) when importable, else from a fixed
`nvidia-smi --query-gpu` command when that program exists; nothing a request names is ever run.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psutil

NVIDIA_SMI_QUERY = ["--query-gpu=name,utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"]
_cache: dict[str, tuple[float, list[dict]]] = {}
psutil.cpu_percent(interval=None)  # the first call only starts psutil's measuring window


def gpus(ttl: float = 5.0) -> list[dict]:
    """[{name, utilization (%), memory_used_mb, memory_total_mb}] per GPU; [] without NVIDIA GPUs."""
    cached = _cache.get("gpus")
    if cached and time.monotonic() - cached[0] < ttl:
        return cached[1]
    found: list[dict] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append({"name": name.decode() if isinstance(name, bytes) else str(name),
                          "utilization": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                          "memory_used_mb": memory.used / 2**20, "memory_total_mb": memory.total / 2**20})
    except Exception:  # no pynvml, no driver: try nvidia-smi
        program = shutil.which("nvidia-smi")
        if program:
            try:
                text = subprocess.run([program, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=3,
                                      check=True).stdout
                for line in text.strip().splitlines():
                    name, util, used, total = [part.strip() for part in line.split(",")]
                    found.append({"name": name, "utilization": float(util), "memory_used_mb": float(used),
                                  "memory_total_mb": float(total)})
            except (OSError, subprocess.SubprocessError, ValueError):
                found = []
    _cache["gpus"] = (time.monotonic(), found)
    return found


def snapshot(runs_dir: str | Path) -> dict:
    """CPU %, memory and the runs folder's disk usage, plus `gpus()`."""
    memory = psutil.virtual_memory()
    try:
        disk = psutil.disk_usage(str(runs_dir))
        disk_info = {"disk_used_gb": disk.used / 1e9, "disk_total_gb": disk.total / 1e9, "disk_percent": disk.percent}
    except OSError:
        disk_info = {"disk_used_gb": None, "disk_total_gb": None, "disk_percent": None}
    return {"cpu_percent": psutil.cpu_percent(interval=None), "cpu_count": psutil.cpu_count(),
            "memory_used_gb": (memory.total - memory.available) / 1e9, "memory_total_gb": memory.total / 1e9,
            "memory_percent": memory.percent, **disk_info, "gpus": gpus()}
