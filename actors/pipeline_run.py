"""`neuronmap extract --engine ray --stages K`: a run written through K pipeline-parallel stage actors.

For a model too large for one device. Where the data-parallel engine (`actors.engine`) gives every
worker the whole model, here one chain of K stage actors (`actors.pipeline.PipelineExtractor`) holds
the model cut into contiguous block ranges, and the driver writes the run:

1. validate and lay the stages out before Ray starts (more stages than blocks, an unknown layer or an
   unsupported family is a one-line ConfigError within a second);
2. tokenise on the driver with the model's own tokenizer (no weights are loaded here);
3. start the stage actors (a GPU asked for on a cluster without one is refused before any actor
   is created), measure the layer shapes with one micro-batch through the stages;
4. create or resume the run (`RunWriter`, the very manifest the local engine writes) and push the
   shards not committed yet through the stages; each shard is committed (`commit_shard`) as its last
   micro-batch comes back, while later micro-batches are already in the pipe.

Activations do pass through the driver here (the stages return pooled rows; the driver is the only
writer), which is what lets `--out` be a folder only the driver sees. A micro-batch is exactly one
local-engine batch, so on CPU float32 the run equals the in-process engine's bit for bit (same torch
thread count: one per stage by default). A failure marks the run failed (Ctrl-C leaves it running);
re-running the same command resumes from the committed shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from neuronmap.errors import ConfigError

from . import options as ray_options
from .cluster import ray_session
from .errors import failure_recorded


def run_pipeline_run(
    *,
    model: Any,
    prompts: Any,
    stages: int,
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
    cpus_per_stage: float | None = None,
    gpus_per_stage: float | None = None,
    on_shard: Callable[[dict], None] | None = None,
    on_stages: Callable[[list[dict]], None] | None = None,
) -> Any:
    """Extract through `stages` stage actors and write the run; equals `neuronmap.extract`'s run.

    Parameters are `neuronmap.extract`'s, plus:

    stages : int
        Stage actors K, 1 <= K <= the model's number of blocks (K=1: the whole model in one actor).
    cpus_per_stage, gpus_per_stage : float, optional
        Resources reserved per stage actor (default 1 CPU, 0 GPUs). A stage's torch uses as many
        threads as whole CPUs reserved (at least one). With GPUs each stage runs on its GPU.
    on_shard : callable, optional
        Called with `{shard, samples, paths, sha256}` after each committed shard.
    on_stages : callable, optional
        Called once, after the last shard, with each stage's `StageWorker.info()` (blocks, parameters,
        peak RSS, node, busy and CPU seconds).
    """
    import torch

    from neuronmap.extraction import (RunPlan, default_out, new_manifest, preparation_progress, tokenize_batches,
                                      tokenize_threads)
    from neuronmap.prompt_table import stage_prompts, staging_folder

    from .pipeline import PipelineExtractor, PipelineOptions
    from .stage_loading import model_dtype as stage_model_dtype

    cpus = 1.0 if cpus_per_stage is None else float(cpus_per_stage)
    gpus = 0.0 if gpus_per_stage is None else float(gpus_per_stage)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"stages={stages!r} must be an integer >= 1 (the number of pipeline stage actors)")
    if cpus <= 0:
        raise ConfigError(f"cpus_per_stage={cpus:g} must be > 0 (fractions such as 0.5 are fine)")
    if gpus < 0:
        raise ConfigError(f"gpus_per_stage={gpus:g} must be >= 0")
    on_gpu = _stage_device(device, gpus)
    name, source, config, config_hash, tokenizer = _describe_model(model)
    out = Path(out) if out is not None else default_out(name)

    options = PipelineOptions(stages=stages, num_cpus_per_stage=cpus, num_gpus_per_stage=gpus,
                              micro_batch_size=batch_size, model_dtype=model_dtype)
    extractor = PipelineExtractor(source, layers, pooling=pooling, dtype=dtype, options=options)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    max_length = int(limit) if limit and max_length > limit else max_length  # as plan_run does
    computed = stage_model_dtype(config, model_dtype, torch.device("cuda" if on_gpu else "cpu"))

    # The prompt table is staged beside the run and the token ids spill to a file: the driver holds
    # neither whole (as the local engine).
    with staging_folder(out) as staging:
        with preparation_progress(progress) as task:
            staged = stage_prompts(prompts, staging, text_column=text_column, on_rows=task("read prompts"))
            extractor.layout()  # bad stages/layers/family: ConfigError before Ray starts
            tokens = tokenize_batches(tokenizer, staged.text_batches(), max_length, spill=staging / "token-ids.int32",
                                      on_batch=task("tokenize", staged.n_samples), threads=tokenize_threads())
        with ray_session(address, num_cpus=stages * cpus), ray_options.quiet_logs():
            _check_gpus(gpus)
            with extractor:
                plan = extractor.plan(tokens, samples_per_shard)
                run_plan = RunPlan(model=name, config_hash=config_hash, tokenizer=tokenizer.name_or_path,
                                   source=source, model_dtype=str(computed).removeprefix("torch."), shapes=plan.shapes,
                                   kinds=plan.kinds, samples_per_shard=plan.samples_per_shard, max_length=max_length,
                                   lengths=tokens.lengths, n_truncated=tokens.n_truncated)
                manifest = new_manifest(run_plan, prompts, staged.source_hash, pooling, dtype, format, compression,
                                        batch_size)
                _write(extractor, run_plan, tokens, staged.path, manifest, out, format, compression, overwrite,
                       batch_size, pooling == "none", progress,
                       f"extract {name} on ray ({extractor.n_started} stages)", on_shard)
                if on_stages is not None:
                    on_stages(extractor.info())
    from neuronmap.store import open_run

    return open_run(out)


def _write(extractor: Any, run_plan: Any, tokens: Any, prompts_path: Path, manifest: Any, out: Path, format: str,
           compression: str | None, overwrite: bool, batch_size: int, per_token: bool, progress: bool,
           description: str, on_shard: Callable[[dict], None] | None) -> None:
    """Create or resume the run at `out` and commit every missing shard as the stages deliver it."""
    from neuronmap.extraction import commit_shard, progress_bar
    from neuronmap.store import RunWriter

    writer = RunWriter(out, manifest, format=format, compression=compression, overwrite=overwrite)
    writer.adopt_prompts(prompts_path)
    shards = run_plan.shards()
    index_of = {samples.start: index for index, samples in enumerate(shards)}
    todo = [samples for index, samples in enumerate(shards)
            if not all(writer.committed(name, index) for name in run_plan.layers)]
    with failure_recorded(writer):  # the run stays resumable; the worker's error comes out typed
        with progress_bar(progress, run_plan.n_samples, description) as bar:
            bar.advance(0, run_plan.n_samples - sum(len(samples) for samples in todo))  # resumed shards
            for samples, arrays in extractor.iter_shards(run_plan, tokens, todo, batch_size,
                                                         on_batch=lambda n: bar.advance(0, n)):
                index = index_of[samples.start]
                part = slice(samples.start, samples.stop)
                records = commit_shard(writer, index, samples, run_plan.first_row(samples.start, per_token), arrays,
                                       np.arange(samples.start, samples.stop, dtype=np.int64), tokens.lengths[part],
                                       per_token)
                if on_shard is not None:
                    on_shard({"shard": index, "samples": len(samples), "paths": [r.path for r in records],
                              "sha256": [r.sha256 for r in records]})
        writer.complete()


def _stage_device(device: str, gpus: float) -> bool:
    """Whether the stages compute on GPUs; `--device` must agree with `--gpus-per-stage`."""
    wants_cuda = str(device).startswith("cuda")
    if device not in ("auto", "cpu") and not wants_cuda:
        raise ConfigError(f"device={device!r} is not supported with --stages; use auto, cpu or cuda "
                          "(each stage runs on the GPU Ray gives it)")
    if gpus > 0 and device == "cpu":
        raise ConfigError(f"--device cpu contradicts --gpus-per-stage {gpus:g}; leave out one of them")
    if wants_cuda and gpus == 0:
        raise ConfigError(f"--device {device} with --stages needs GPUs reserved for the stages: "
                          "add --gpus-per-stage 1")
    return gpus > 0


def _check_gpus(gpus: float) -> None:
    """GPUs asked for on a cluster with none: one clear line instead of actors pending forever."""
    import ray

    if gpus <= 0:
        return
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if not any(node.get("GPU", 0.0) > 0 for node in nodes):
        total = sum(node.get("CPU", 0.0) for node in nodes)
        raise ConfigError(f"--gpus-per-stage {gpus:g} asks for GPUs but the Ray cluster has none ({total:g} CPUs, "
                          "0 GPUs); leave out --gpus-per-stage to run the stages on CPUs or join a cluster with GPUs")


def _describe_model(model: Any) -> tuple[str, str, Any, str, Any]:
    """(name, source, config, config hash, tokenizer) exactly as `load_model` resolves them, without loading weights.

    The manifest's model, source and tokenizer fields and the tokenisation must equal the local
    engine's, so the same resolution functions are used.
    """
    from neuronmap.models import LoadedModel
    from neuronmap.models.loading import _load_config, _load_tokenizer, config_hash, resolve_source

    if isinstance(model, LoadedModel):  # the stages load their own slices from the same source
        return str(model.name), str(model.source), model.model.config, model.config_hash, model.tokenizer
    name, source, entry, offline = resolve_source(model)
    config = _load_config(name, source, entry, offline)
    return name, source, config, config_hash(config), _load_tokenizer(name, source, bool(offline))
