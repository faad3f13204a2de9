"""What runs on the cluster: the planning task, the tokenise stage and the extraction worker.

All three call the core's functions (`plan_run`, `tokenize_prompts`, `extract_shard`, `BatchPooler`,
`commit_shard`), so a Ray run computes exactly what an in-process run computes: the same shard
boundaries, the same length-sorted batches inside each shard, the same pooling on the device.

A shard travels as one dataset row: `shard`, `start`, `stop` (positions in prompts.parquet),
`row_start` (first row in every layer), `sample_id` and `lengths` (the planner's token counts) and
`text`; the tokenise stage replaces `text` with `ids` (all token ids of the shard, concatenated).
The worker writes and commits the shard itself (`RunWriter.attach`) and returns one small record
row; activations never travel back to the driver.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .errors import WorkerError, worker_label


@dataclass(frozen=True)
class WorkerSpec:
    """What every extraction worker needs to know (picklable; built by the driver from the RunPlan)."""

    run: str  # absolute run folder, on a filesystem every worker and the driver share
    source: str  # what from_pretrained loads (folder or hub id), as the planner resolved it
    device: str
    model_dtype: str
    config_hash: str
    shapes: dict  # layer -> feature shape, in extraction order
    kinds: dict
    pooling: str
    dtype: str
    batch_size: int
    max_length: int
    pattern_width: int
    threads: int = 1  # torch intra-op threads: the CPUs reserved for the worker


class _StoredBatches:
    """Text batches held in Ray's object store, as `plan_run` reads a staged table: one batch at a time."""

    def __init__(self, refs: list[Any]):
        self.refs = refs

    def text_batches(self) -> Iterator[list[str]]:
        import ray

        for ref in self.refs:
            yield ray.get(ref)


def plan_remote(model: str, device: str, model_dtype: str, texts: list[Any], layers: Any, pooling: str, dtype: str,
                max_length: int, samples_per_shard: int | None) -> Any:
    """Load the model where workers run and plan the run (tokenise all prompts, measure layer shapes).

    texts : the prompts, or ObjectRefs of batches of them (the engine's way: see `engine._plan`)
    Returns a RunPlan; any failure comes back as a WorkerError carrying the cause.
    """
    import ray

    from neuronmap.extraction import plan_run
    from neuronmap.models import load_model

    try:
        _quiet_transformers()
        loaded = load_model(model, device=device, dtype=model_dtype)
        if texts and isinstance(texts[0], ray.ObjectRef):  # batches in the object store, fetched one at a time
            texts = _StoredBatches(texts)
        run_plan, _tokens, _plan = plan_run(loaded, texts, layers, pooling, dtype, max_length, samples_per_shard)
        return run_plan
    except Exception as error:
        raise WorkerError.wrap(error, doing="could not plan the run") from None


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(source: str) -> Any:
    """One tokenizer per process and source (tokenise tasks reuse their process across shards)."""
    if source not in _TOKENIZERS:
        from transformers import AutoTokenizer

        from neuronmap.errors import ConfigError
        from neuronmap.models.loading import ensure_padding

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as error:
            reason = " ".join(str(error).split())[:200]
            raise ConfigError(f"no loadable tokenizer at {source!r} on this node ({reason}); "
                              "every node needs the model folder at the same path") from None
        ensure_padding(tokenizer)
        _TOKENIZERS[source] = tokenizer
    return _TOKENIZERS[source]


def tokenize_shards(table: pa.Table, source: str, max_length: int, prompts: str | None = None) -> pa.Table:
    """Tokenise stage: each row's texts -> `ids` (concatenated token ids, int32), same truncation.

    The texts are the row's `text` list, or else rows `start..stop-1` of the prompt table at
    `prompts` (the run's prompts.parquet, which every node sees at the same path as the run).
    """
    from neuronmap.errors import ConfigError
    from neuronmap.extraction import tokenize_prompts

    try:
        _quiet_transformers()
        tokenizer = _tokenizer(source)
        ids = []
        for row in range(table.num_rows):
            shard, planned = table.column("shard")[row].as_py(), table.column("lengths")[row].as_py()
            texts = table.column("text")[row].as_py() if "text" in table.column_names else \
                _shard_texts(prompts, table.column("start")[row].as_py(), table.column("stop")[row].as_py())
            tokens = tokenize_prompts(tokenizer, texts, max_length)
            if tokens.lengths.tolist() != planned:
                raise ConfigError(f"shard {shard} tokenises differently on this node than on the planner; "
                                  "give every node the same tokenizer (and transformers version)")
            ids.append(np.concatenate([np.asarray(seq, dtype=np.int32) for seq in tokens.ids]))
        kept = table.drop_columns(["text"]) if "text" in table.column_names else table
        return kept.append_column("ids", pa.array(ids, type=pa.list_(pa.int32())))
    except Exception as error:
        raise WorkerError.wrap(error, doing="could not tokenise") from None


def _shard_texts(prompts: str | None, start: int, stop: int) -> list[str]:
    from neuronmap.errors import ConfigError
    from neuronmap.prompt_table import read_texts

    if prompts is None or not os.path.isfile(prompts):
        raise ConfigError(f"the run's prompt table {prompts} is not visible on this node: --out must be a folder "
                          "every Ray node shares at the same path")
    return read_texts(prompts, start, stop)


# `node` (Ray node id), `cpu_s` (process CPU seconds of the shard) and `peak_rss` (bytes) say where
# and at what cost a shard was made: multi-node tests and the scale benchmark read them.
RECORD_SCHEMA = pa.schema([("shard", pa.int64()), ("samples", pa.int64()), ("host", pa.string()),
                           ("pid", pa.int64()), ("paths", pa.list_(pa.string())), ("sha256", pa.list_(pa.string())),
                           ("seconds", pa.float64()), ("node", pa.string()), ("cpu_s", pa.float64()),
                           ("peak_rss", pa.int64())])


class ExtractionWorker:
    """Ray Data actor: loads the model once, then extracts and commits one shard per call.

    The model is loaded in `__init__` (once per actor, again after a restart); `__call__` does only
    the shard. A shard whose layers are all committed already (a retry after the worker died
    between committing and answering) is skipped, so a retry never duplicates or loses rows.
    """

    def __init__(self, spec: WorkerSpec):
        import torch

        from neuronmap.errors import ConfigError
        from neuronmap.extraction import STORAGE_DTYPES, BatchPooler
        from neuronmap.models import load_model

        self.spec = spec
        self.label = worker_label()
        try:
            _quiet_transformers()
            # Results on CPU depend (at float32 rounding level) on the thread count: pin it to the
            # reserved CPUs so a run is reproducible whatever the node's core count.
            torch.set_num_threads(max(1, spec.threads))
            self.loaded = load_model(spec.source, device=spec.device, dtype=spec.model_dtype)
            if self.loaded.config_hash != spec.config_hash:
                raise ConfigError(f"the model at {spec.source} on this node differs from the planned one (config "
                                  f"hash {self.loaded.config_hash[:12]} != {spec.config_hash[:12]}); "
                                  "give every node the same model")
            self.refs = self.loaded.adapter.resolve(list(spec.shapes))
            if [ref.name for ref in self.refs] != list(spec.shapes):
                raise ConfigError(f"layers resolve differently on this node: {[r.name for r in self.refs]} "
                                  f"!= {list(spec.shapes)}")
            self.pooler = BatchPooler(spec.pooling, STORAGE_DTYPES[spec.dtype], pattern_width=spec.pattern_width)
        except Exception as error:
            raise WorkerError.wrap(error, self.label, doing="could not start") from None

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for row in table.to_pylist():
            try:
                rows.append(self._shard(row))
            except Exception as error:
                raise WorkerError.wrap(error, self.label, doing=f"failed on shard {row['shard']}") from None
        return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)

    def _shard(self, row: dict) -> dict:
        from neuronmap.errors import ConfigError
        from neuronmap.extraction import ExtractionPlan, TokenizedPrompts, commit_shard, extract_shard
        from neuronmap.store import RunWriter

        from .stage_worker import peak_rss_bytes, ray_node_id

        began, cpu = time.perf_counter(), time.process_time()
        spec, shard = self.spec, int(row["shard"])
        samples = range(int(row["start"]), int(row["stop"]))
        writer = RunWriter.attach(spec.run)
        done = {"shard": shard, "samples": len(samples), "host": self.label.rpartition(":")[0], "pid": os.getpid(),
                "paths": [], "sha256": [], "node": ray_node_id()}

        def finished(**fields: Any) -> dict:
            return {**done, **fields, "seconds": time.perf_counter() - began, "cpu_s": time.process_time() - cpu,
                    "peak_rss": peak_rss_bytes()}

        if all(writer.committed(name, shard) for name in spec.shapes):
            return finished()
        lengths = np.asarray(row["lengths"], dtype=np.int64)
        flat = np.asarray(row["ids"], dtype=np.int64)
        if len(flat) != lengths.sum():  # the tokenise stage checked every length; this guards the transport
            raise ConfigError(f"shard {shard} arrived with {len(flat)} token ids, expected {int(lengths.sum())}")
        ids = np.split(flat, np.cumsum(lengths)[:-1])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = TokenizedPrompts(ids=ids, lengths=lengths, n_truncated=0, max_length=spec.max_length)
        plan = ExtractionPlan(refs=self.refs, shapes=spec.shapes, kinds=spec.kinds, samples_per_shard=len(samples),
                              row_offsets=offsets)
        arrays = extract_shard(self.loaded, plan, tokens, range(0, len(samples)), self.pooler, spec.batch_size)
        records = commit_shard(writer, shard, samples, int(row["row_start"]), arrays,
                               np.asarray(row["sample_id"], dtype=np.int64), lengths, spec.pooling == "none")
        return finished(paths=[r.path for r in records], sha256=[r.sha256 for r in records])


def _quiet_transformers() -> None:
    if os.environ.get("NEURONMAP_DEBUG"):
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
