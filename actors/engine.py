"""The `ray` extraction engine: `neuronmap extract --engine ray` (entry point `neuronmap.engines:ray`).

Driver, in order:
1. connect to Ray (embedded local cluster, or `--address`), check the workers fit the cluster;
2. plan where the workers run: one Ray task with a worker's resources loads the model, tokenises
   every prompt and measures the layer shapes (`neuronmap.extraction.plan_run`, the same function the
   local engine calls), returning a model-free RunPlan;
3. create or resume the run (`RunWriter`, same manifest as the local engine) and write prompts.parquet;
4. Ray Data pipeline over the shards not committed yet: shard rows (prompts) -> tokenise (tasks) ->
   `ExtractionWorker` actor pool; each worker writes and commits its shards into the run itself
   (`RunWriter.attach`) and returns a small record, never activations;
5. merge: check every record against the manifest, drop temp files of killed workers, complete.

A failure marks the run failed (a Ctrl-C leaves it running); both resume by re-running the command.

With `--stages K` the model is cut into K block ranges on a chain of stage actors instead, and the
driver writes the run (`actors.pipeline_run`): pipeline parallelism for a model too large for one
device, same run again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from neuronmap.errors import ConfigError, StorageError, UnknownLayerError

from . import options
from .cluster import check_resources, ray_session
from .errors import failure_recorded, find_worker_error


def run_ray_extraction(
    *,
    model: Any,
    prompts: Any,
    layers: str | Sequence[str] = "blocks.*",
    out: str | Path | None = None,
    pooling: str = "mean",
    format: str = "hdf5",
    dtype: str = "float32",
    batch_size: int = 32,
    max_length: int = 512,
    device: str = "auto",
    model_dtype: str = "auto",
    compression: str | None = None,
    overwrite: bool = False,
    text_column: str | None = None,
    samples_per_shard: int | None = None,
    progress: bool = False,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    stages: int | None = None,
    cpus_per_stage: float | None = None,
    gpus_per_stage: float | None = None,
    on_shard: Callable[[dict], None] | None = None,
    on_stages: Callable[[list[dict]], None] | None = None,
) -> Any:
    """Run `neuronmap.extract` on Ray; the run equals the local engine's (rows, values, manifest).

    Parameters are `neuronmap.extract`'s (called through it with `engine="ray"`), plus:

    address : str, optional
        `auto`, `HOST:PORT` or `ray://HOST:PORT`; None starts an embedded local cluster.
    workers : int, optional
        Fixed number of extraction workers; None autoscales from 1 to what fits the cluster.
    cpus_per_worker, gpus_per_worker : float, optional
        Resources reserved per worker (default 1 CPU, 0 GPUs); a worker's torch uses that many threads.
    stages : int, optional
        Pipeline parallelism instead of data parallelism: the model is cut into `stages` contiguous
        block ranges, one stage actor each (`actors.pipeline_run`); `workers`/`*_per_worker` do not apply.
    cpus_per_stage, gpus_per_stage : float, optional
        Resources reserved per stage actor (default 1 CPU, 0 GPUs); only with `stages`.
    on_shard : callable, optional
        Called on the driver with each shard record (`shard`, `samples`, `host`, `pid`, `node`,
        `paths`, ...) as workers finish shards.
    on_stages : callable, optional
        With `stages`: called once with each stage actor's info (blocks, peak RSS, node, CPU seconds).
    """
    common = dict(model=model, prompts=prompts, layers=layers, out=out, pooling=pooling, format=format, dtype=dtype,
                  batch_size=batch_size, max_length=max_length, device=device, model_dtype=model_dtype,
                  compression=compression, overwrite=overwrite, text_column=text_column,
                  samples_per_shard=samples_per_shard, progress=progress, address=address)
    per_worker = {"workers": workers, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker}
    per_stage = {"cpus_per_stage": cpus_per_stage, "gpus_per_stage": gpus_per_stage}
    if stages is not None:
        given = [name for name, value in per_worker.items() if value is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ConfigError(f"{flags} size the data-parallel worker pool and do not apply with --stages; use "
                              "--cpus-per-stage / --gpus-per-stage, or leave out --stages")
        from .pipeline_run import run_pipeline_run

        return run_pipeline_run(**common, stages=stages, cpus_per_stage=cpus_per_stage,
                                gpus_per_stage=gpus_per_stage, on_shard=on_shard, on_stages=on_stages)
    given = [name for name, value in per_stage.items() if value is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"{flags} only apply to pipeline stages; add --stages K or use --cpus-per-worker / "
                          "--gpus-per-worker")
    from neuronmap.extraction import default_out, new_manifest, preparation_progress, progress_bar
    from neuronmap.models import LoadedModel
    from neuronmap.prompt_table import stage_prompts, staging_folder
    from neuronmap.store import RunWriter, open_run
    from neuronmap.store.manifest import PROMPTS_NAME

    cpus = 1.0 if cpus_per_worker is None else float(cpus_per_worker)
    gpus = 0.0 if gpus_per_worker is None else float(gpus_per_worker)
    if workers is not None and workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1 (or left out to autoscale)")
    if cpus <= 0:
        raise ConfigError(f"cpus_per_worker={cpus:g} must be > 0 (fractions such as 0.5 are fine)")
    if gpus < 0:
        raise ConfigError(f"gpus_per_worker={gpus:g} must be >= 0")
    if isinstance(model, LoadedModel):  # workers load their own copy from the same source
        model = model.source
    model = str(model)
    # The prompt table is staged beside the run, in chunks: the driver never holds it whole.
    with staging_folder(Path(out) if out is not None else default_out(model)) as staging:
        with preparation_progress(progress) as task:
            staged = stage_prompts(prompts, staging, text_column=text_column, on_rows=task("read prompts"))
        with ray_session(address, num_cpus=(workers or 1) * cpus + options.TOKENIZE_CPUS), options.quiet_logs():
            capacity = check_resources(workers, cpus, gpus)
            plan = _plan(model, device, model_dtype, staged, layers, pooling, dtype, max_length, samples_per_shard,
                         cpus, gpus)
            out = Path(out) if out is not None else default_out(plan.model)
            manifest = new_manifest(plan, prompts, staged.source_hash, pooling, dtype, format, compression, batch_size)
            writer = RunWriter(out, manifest, format=format, compression=compression, overwrite=overwrite)
            writer.adopt_prompts(staged.path)
            with failure_recorded(writer):  # the run stays resumable; the worker's error comes out typed
                per_token = pooling == "none"
                shards = plan.shards()
                todo = [i for i in range(len(shards)) if not all(writer.committed(name, i) for name in plan.layers)]
                with progress_bar(progress, plan.n_samples, f"extract {plan.model} on ray") as bar:
                    bar.advance(0, plan.n_samples - sum(len(shards[i]) for i in todo))  # resumed shards
                    records = []
                    for record in _pipeline(out, plan, out / PROMPTS_NAME, shards, todo, per_token, device, model_dtype,
                                            pooling, dtype, batch_size, workers, capacity.max_workers, cpus, gpus):
                        records.append(record)
                        bar.advance(0, record["samples"])
                        if on_shard is not None:
                            on_shard(record)
                _merge(writer, records, out)
                writer.complete()
    return open_run(out)


def _plan(model: str, device: str, model_dtype: str, staged: Any, layers: Any, pooling: str, dtype: str,
          max_length: int, samples_per_shard: int | None, cpus: float, gpus: float) -> Any:
    """Run the planning task with one worker's resources; its errors come back typed.

    The texts go to the task as object-store batches (`StagedPrompts.text_batches`), put one at a
    time, so neither the driver nor the task holds them all.
    """
    import ray

    from .worker import plan_remote

    batches = [ray.put(batch) for batch in staged.text_batches(rows=8192)]
    task = ray.remote(plan_remote).options(**options.plan_task_options(cpus, gpus))
    try:
        return ray.get(task.remote(model, device, model_dtype, batches, layers, pooling, dtype, max_length,
                                   samples_per_shard))
    except Exception as error:
        worker_error = find_worker_error(error)
        if isinstance(getattr(worker_error, "cause", None), UnknownLayerError):
            # The same on every node: the error the local engine raises, without the worker's name.
            raise worker_error.cause from None
        if worker_error is not None:
            raise worker_error from None  # a model that fails to load may be one node's problem: name it
        raise


def _shard_table(index: int, samples: range, row_start: int, lengths: np.ndarray,
                 texts: list[str] | None = None) -> pa.Table:
    """One dataset row (one block) per shard: what the tokenise stage and a worker need, nothing more.

    texts : the shard's prompts; by default the tokenise stage reads them from the run's prompt
        table itself, so neither the driver nor the object store holds every prompt
    """
    columns = {
        "shard": pa.array([index], pa.int64()), "start": pa.array([samples.start], pa.int64()),
        "stop": pa.array([samples.stop], pa.int64()), "row_start": pa.array([row_start], pa.int64()),
        "sample_id": pa.array([np.arange(samples.start, samples.stop, dtype=np.int64)], pa.list_(pa.int64())),
        "lengths": pa.array([lengths[samples.start : samples.stop]], pa.list_(pa.int64())),
    }
    if texts is not None:
        columns["text"] = pa.array([texts], pa.list_(pa.string()))
    return pa.table(columns)


def _pipeline(out: Path, plan: Any, prompts_path: Path, shards: list[range], todo: list[int], per_token: bool, device: str,
              model_dtype: str, pooling: str, dtype: str, batch_size: int, workers: int | None, max_workers: int,
              cpus: float, gpus: float):
    """Yield one record dict per shard as workers commit them (streaming; nothing else comes back)."""
    if not todo:
        return
    import ray.data

    from .worker import ExtractionWorker, WorkerSpec, tokenize_shards

    spec = WorkerSpec(run=str(out.resolve()), source=plan.source, device=device, model_dtype=model_dtype,
                      config_hash=plan.config_hash, shapes=dict(plan.shapes), kinds=dict(plan.kinds), pooling=pooling,
                      dtype=dtype, batch_size=batch_size, max_length=plan.max_length, pattern_width=plan.pattern_width,
                      threads=max(1, int(cpus)))
    # Shards travel without their texts: the tokenise stage reads each shard's rows of the run's
    # prompt table (which every node sees, as it sees the run), so no process holds every prompt.
    tables = [_shard_table(i, shards[i], plan.first_row(shards[i].start, per_token), plan.lengths) for i in todo]
    with options.data_context():
        ds = ray.data.from_arrow(tables)  # one block per shard: shards spread over the workers
        ds = options.map_tokenize(ds, tokenize_shards, workers or max_workers, n_shards=len(tables),
                                  source=plan.source, max_length=plan.max_length,
                                  prompts=str(Path(prompts_path).resolve()))
        ds = options.map_workers(ds, ExtractionWorker, {"spec": spec}, workers, max_workers, cpus, gpus,
                                 n_shards=len(tables))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()


def _merge(writer: Any, records: list[dict], out: Path) -> None:
    """Check the workers' records against the manifest they committed to; drop killed workers' temp files.

    A record whose shard the driver cannot see means the run folder is not shared between the driver
    and that worker (different machines without a shared filesystem).
    """
    from neuronmap.store import load_manifest
    from neuronmap.store.manifest import TMP_MARKER

    listed = {shard.path: shard.sha256 for shard in load_manifest(out).shards}
    for record in records:
        for path, digest in zip(record["paths"], record["sha256"]):
            if path not in listed or not (out / path).exists():
                raise ConfigError(f"worker {record['host']}:{record['pid']} committed {path}, which the driver cannot "
                                  f"see in {out}: --out must be a folder every Ray node shares at the same path")
            if listed[path] != digest:
                raise StorageError(f"shard {path} was rewritten with different bytes by another worker; "
                                   "re-run the same command to resume and verify with `neuronmap runs verify`")
    for root, _dirs, files in os.walk(out):
        for name in files:
            if TMP_MARKER in name:
                with contextlib.suppress(OSError):
                    os.unlink(Path(root) / name)
