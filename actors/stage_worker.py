"""One pipeline stage: a contiguous block range of a model, its captures, run as a Ray actor.

``StageWorker`` loads only its slice of the model (``stage_loading``), runs it the way the base model's
``forward`` would (``stage_runners``) and captures the canonical layers it owns with the extraction's
``Capture`` + ``BatchPooler`` (pooling and cast on the stage's device). It is a plain class, so it
can be tried in-process before it is wrapped by ``ray.remote`` (``actors.pipeline`` does that).
"""

from __future__ import annotations

import resource
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuronmap.errors import ConfigError
from neuronmap.extraction import STORAGE_DTYPES, BatchPooler

from .errors import WorkerError
from .stage_loading import blocks_path
from .stage_runners import get_runner


@dataclass(frozen=True)
class StageSpec:
    """What one stage actor loads and captures (picklable)."""

    index: int
    folder: str  # the checkpoint folder as the driver resolved it
    source: str  # what the user named (folder, registry name, hub id): resolved again where it is missing
    blocks: range
    first: bool
    last: bool  # holds the final norm
    stop: bool  # last started stage: stop after its last requested layer, send nothing on
    layers: tuple[str, ...]
    pooling: str
    dtype: str
    model_dtype: str
    attn_implementation: str | None
    use_gpu: bool
    threads: int


def _to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor inside (dicts, tuples, lists) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device) for item in value)
    return value


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StageWorker:
    """One pipeline stage (a Ray actor; also usable in-process): its blocks, its captures.

    ``forward(payload) -> (payload for the next stage or None, {layer: ndarray})``. The first stage's
    payload holds ``input_ids``; later ones ``hidden`` and ``context``; every payload carries the
    2-D ``attention_mask`` (pooling) and ``pattern_width`` (padding of stored attention patterns).
    """

    def __init__(self, spec: StageSpec) -> None:
        from neuronmap.models.adapter import ModelAdapter
        from neuronmap.models.architectures import get_path

        from .stage_loading import load_stage_model, resolve_checkpoint

        # An exception raised in an actor's __init__ reaches the driver as ActorDiedError with the
        # cause flattened to text (Ray 2.60); kept here and raised by the first call instead, it
        # arrives typed (a WorkerError whose .cause is the original exception).
        self.failed: WorkerError | None = None
        try:
            _quiet_transformers()
            torch.set_num_threads(spec.threads)
            self.spec = spec
            device = "cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu"
            folder = Path(spec.folder) if Path(spec.folder).is_dir() else resolve_checkpoint(spec.source)
            self.model, self.report = load_stage_model(folder, spec.blocks, spec.first, spec.last, device,
                                                       spec.model_dtype, spec.attn_implementation)
            self.device = torch.device(device)
            self.runner = get_runner(self.model.config.model_type)
            self.block_list = get_path(self.model, blocks_path(self.model))
            self.refs = ModelAdapter(self.model).resolve(list(spec.layers)) if spec.layers else []
            self.pooler = BatchPooler(spec.pooling, STORAGE_DTYPES[spec.dtype], pattern_width=1)
            self.intervals: deque[tuple[float, float, float]] = deque(maxlen=4096)
            self.busy_s = self.cpu_s = 0.0  # totals over every forward (the deque keeps only recent ones)
        except Exception as error:
            self.failed = WorkerError.wrap(error, doing=f"could not start pipeline stage {spec.index}")

    def info(self) -> dict[str, Any]:
        """Load report (blocks, checkpoint keys read, parameter count), owned state-dict keys, memory."""
        if self.failed is not None:
            raise self.failed
        report = asdict(self.report)
        report.update(index=self.spec.index, layers=list(self.spec.layers), state_keys=list(self.model.state_dict()),
                      rss=_rss_bytes(), peak_rss_bytes=peak_rss_bytes(), threads=torch.get_num_threads(),
                      node=ray_node_id(), busy_s=self.busy_s, cpu_s=self.cpu_s)
        return report

    def busy_intervals(self) -> list[tuple[float, float, float]]:
        """``(start, end, cpu_seconds)`` of the recent ``forward`` calls: wall-clock times (comparable
        across the stages of one machine: shows them working at once) and the process CPU time used."""
        return list(self.intervals)

    def forward(self, payload: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
        from neuronmap.capture import Capture

        if self.failed is not None:
            raise self.failed
        began, cpu = time.time(), time.process_time()
        try:
            mask = payload["attention_mask"].to(self.device)
            self.pooler.mask, self.pooler.pattern_width = mask, payload["pattern_width"]
            with torch.inference_mode(), Capture(self.refs, self.pooler, stop_early=self.spec.stop) as cap:
                result = cap.run(self._run, payload, mask)
            if cap.missing():
                raise ConfigError(f"layers {', '.join(cap.missing())} did not run in pipeline stage {self.spec.index}")
            captured = {name: value.cpu().numpy() for name, value in cap.outputs.items()}
            span = (began, time.time(), time.process_time() - cpu)
            self.intervals.append(span)
            self.busy_s += span[1] - span[0]
            self.cpu_s += span[2]
            if self.spec.stop:
                return None, captured
            hidden, context = result
            return {"attention_mask": payload["attention_mask"], "pattern_width": payload["pattern_width"],
                    "hidden": hidden.cpu(), "context": _to(context, "cpu")}, captured
        except Exception as error:
            raise WorkerError.wrap(error, doing=f"failed in pipeline stage {self.spec.index}") from None

    def _run(self, payload: dict[str, Any], mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.spec.first:
            hidden, context = self.runner.embed(self.model, payload["input_ids"].to(self.device), mask)
        else:
            hidden, context = payload["hidden"].to(self.device), _to(payload["context"], self.device)
        for index in self.spec.blocks:
            hidden = self.runner.call_block(self.block_list[index], index, hidden, context, self.model.config)
        if self.spec.last:
            hidden = self.runner.finish(self.model, hidden)
        return hidden, context


def ray_node_id() -> str | None:
    """Ray node id of this process (None when it runs outside Ray): where a stage or worker ran."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # pragma: no cover - a Ray without runtime context
        return None


def _rss_bytes() -> dict[str, int]:
    """Resident memory now, split as Linux reports it: anonymous (weights, activations), file-backed
    (mapped files: libraries, a checkpoint being read) and shared memory (Ray's object store)."""
    import psutil

    out = {"rss": int(psutil.Process().memory_info().rss)}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
