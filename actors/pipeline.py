"""Pipeline-parallel extraction: a model cut into K contiguous block ranges, one Ray actor per range.

For a model too large for one device. Stage ``s`` holds blocks ``ranges[s]`` (balanced by block
count), the first stage also the embeddings, the last one the final norm; each stage reads only its
own weights from the checkpoint (``stage_loading``). A micro-batch enters stage 0 as token ids and
leaves each stage as an ObjectRef to ``hidden`` plus the per-batch ``context`` the blocks need
(attention mask in the blocks' own form, position ids, rotary cos/sin: ``stage_runners``). The
driver chains ``stage[s+1].forward.remote(ref_from_stage_s)`` without waiting, so stage ``s+1``
works on micro-batch ``m - 1`` while stage ``s`` works on ``m``; at most ``max_in_flight``
micro-batches are in the pipe.

Each stage captures the canonical layers it owns (``Capture`` + the extraction's ``BatchPooler``:
pooling and cast happen in the stage, on its device) and returns them to the driver as small numpy
arrays. Stages after the last one that owns a requested layer are not started (their blocks would
never run), and the last started stage stops right after its last requested layer, as the local
engine's ``stop_early`` does.

Exactness: a micro-batch is exactly one batch of the local engine (same length-sorted batches
inside each shard, see ``iter_shards``), and every stage calls the very modules and mask helpers the
base model's ``forward`` calls, so on CPU float32 the arrays equal ``neuronmap.extract``'s bit for bit.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from neuronmap.errors import ConfigError
from neuronmap.extraction import (STORAGE_DTYPES, ExtractionPlan, TokenizedPrompts, length_sorted_batches, pad_batch,
                                  shard_ids, tokenize_prompts)

from . import options as ray_options
from .errors import WorkerError, find_worker_error
from .stage_loading import (blocks_path, checkpoint_index, load_config, match_checkpoint_keys, meta_model,
                            resolve_checkpoint)
from .stage_runners import get_runner
from .stage_worker import StageSpec, StageWorker

ray_options.setup_environment()


@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline is laid out on the cluster.

    stages : number of stage actors K (1 <= K <= the model's number of blocks)
    num_gpus_per_stage, num_cpus_per_stage : Ray resources reserved by each stage actor
    threads_per_stage : torch intra-op threads in each stage (default: the stage's whole CPUs, at least 1)
    micro_batch_size : prompts per micro-batch; equal to the local engine's batch_size, the output
        is bit-identical to it
    max_in_flight : micro-batches in the pipe at once (default 2 x started stages)
    model_dtype : "auto" (checkpoint dtype on GPU, float32 on CPU), float32, float16, bfloat16
    attn_implementation : transformers attention kernel; None keeps its default (eager when
        attention patterns are asked for)
    start_timeout_s : seconds to wait for every stage to load its weights
    """

    stages: int = 2
    num_gpus_per_stage: float = 0.0
    num_cpus_per_stage: float = 1.0
    threads_per_stage: int | None = None
    micro_batch_size: int = 8
    max_in_flight: int | None = None
    model_dtype: str = "auto"
    attn_implementation: str | None = None
    start_timeout_s: float = 600.0


def split_blocks(n_blocks: int, stages: int) -> list[range]:
    """Contiguous, balanced block ranges; extra blocks go to the later stages (stage 0 holds the embeddings)."""
    if not isinstance(stages, int) or not 1 <= stages <= n_blocks:
        raise ConfigError(f"stages={stages!r} must be between 1 and the model's number of blocks ({n_blocks}); "
                          f"use --stages {n_blocks} or fewer")
    size, extra = divmod(n_blocks, stages)
    ranges, start = [], 0
    for stage in range(stages):
        stop = start + size + (1 if stage >= stages - extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def stage_of_layer(ref: Any, ranges: Sequence[range], block_path: str, runner: Any) -> int:
    """Index of the stage that owns the canonical layer (or ``module:`` path) of ``ref``."""
    last = len(ranges) - 1

    def holding(block: int) -> int:
        return next(s for s, blocks in enumerate(ranges) if block in blocks)

    if ref.name == "embed":
        return 0
    if ref.name == "final":
        return last
    match = re.match(r"blocks\.(\d+)(\.|$)", ref.name)
    if match:
        return holding(int(match.group(1)))
    path = ref.module_path
    if path.startswith(block_path + "."):
        return holding(int(path[len(block_path) + 1:].split(".")[0]))
    top = path.split(".")[0]
    if top in runner.first_modules:
        return 0
    if top in runner.last_modules:
        return last
    raise ConfigError(f"layer {ref.name!r} is outside what pipeline stages run (embeddings, blocks, final norm); "
                      "extract it without --stages")


class PipelineExtractor:
    """K stage actors holding one model; extraction that streams micro-batches through them.

    Parameters
    ----------
    model : str, Path or LoadedModel
        Model folder, registry name or hub id (a LoadedModel gives its ``source``); the checkpoint must
        be safetensors, readable from every node that runs a stage.
    layers : str or list of str
        Layer spec, as for ``neuronmap.extract`` (canonical names, globs, ranges, ``module:`` paths inside
        the embeddings, a block or the final norm).
    pooling, dtype : as for ``neuronmap.extract`` (storage dtype float32 or float16)
    options : PipelineOptions

    Use as a context manager (``start()`` on entry, ``shutdown()`` on exit). Needs a connected Ray.
    """

    def __init__(self, model: Any, layers: str | Sequence[str] = "blocks.*", pooling: str = "mean",
                 dtype: str = "float32", options: PipelineOptions | None = None) -> None:
        self.model = model
        self.layers = layers
        self.pooling = pooling
        self.dtype = dtype
        self.options = options or PipelineOptions()
        self.actors: list[Any] = []

    # ------------------------------------------------------------------------------- set-up
    def layout(self) -> list[StageSpec]:
        """Validate, cut the model into stages and assign the layers (no Ray): the specs to start.

        Raises ConfigError for a bad pooling/dtype, an unsupported family, ``stages`` outside
        [1, n_blocks], a layer no stage runs, or a checkpoint that lacks weights.
        """
        from neuronmap.models.adapter import ModelAdapter
        from neuronmap.models.loading import ensure_padding
        from neuronmap.pooling import check_pooling
        from transformers import AutoTokenizer

        opts = self.options
        check_pooling(self.pooling)
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported for storage; "
                              f"use one of {', '.join(STORAGE_DTYPES)}")
        if opts.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size={opts.micro_batch_size} must be >= 1")
        self.source = str(getattr(self.model, "source", self.model))
        self.folder = resolve_checkpoint(self.source)
        config = load_config(self.folder)
        runner = get_runner(getattr(config, "model_type", None) or type(config).__name__)
        skeleton = meta_model(config, opts.attn_implementation)
        adapter = ModelAdapter(skeleton, name=str(self.folder))
        self.ranges = split_blocks(adapter.n_blocks, opts.stages)
        self.refs = adapter.resolve(self.layers)
        owner = [stage_of_layer(ref, self.ranges, blocks_path(skeleton), runner) for ref in self.refs]
        match_checkpoint_keys(skeleton, checkpoint_index(self.folder))  # fail here, not in a stage
        self.n_started = max(owner) + 1
        attn = opts.attn_implementation
        if attn is None and any(ref.kind == "pattern" for ref in self.refs):
            attn = "eager"  # what adapter.attention_patterns switches the unsharded model to
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        ensure_padding(self.tokenizer)
        threads = opts.threads_per_stage or max(1, int(opts.num_cpus_per_stage))
        return [StageSpec(index=s, folder=str(self.folder), source=self.source, blocks=self.ranges[s], first=s == 0,
                          last=s == len(self.ranges) - 1, stop=s == self.n_started - 1,
                          layers=tuple(ref.name for ref, o in zip(self.refs, owner) if o == s), pooling=self.pooling,
                          dtype=self.dtype, model_dtype=opts.model_dtype, attn_implementation=attn,
                          use_gpu=opts.num_gpus_per_stage > 0, threads=threads)
                for s in range(self.n_started)]

    def start(self) -> "PipelineExtractor":
        """``layout()``, then start the stage actors and wait until each has loaded its weights."""
        import ray

        specs = self.layout()
        opts = self.options
        if not ray.is_initialized():
            raise ConfigError("PipelineExtractor needs a connected Ray: call ray.init() or use "
                              "actors.cluster.ray_session")
        _check_stage_resources(len(specs), opts.num_cpus_per_stage, opts.num_gpus_per_stage)
        remote = ray.remote(StageWorker).options(num_cpus=opts.num_cpus_per_stage,
                                                 num_gpus=opts.num_gpus_per_stage or None, max_restarts=0)
        self.actors = [remote.remote(spec) for spec in specs]
        try:
            self.stage_info = ray.get([actor.info.remote() for actor in self.actors], timeout=opts.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            free = ray.available_resources()
            raise ConfigError(f"{len(specs)} pipeline stages did not start within {opts.start_timeout_s:g} s "
                              f"(each needs {opts.num_cpus_per_stage:g} CPUs, {opts.num_gpus_per_stage:g} GPUs; free "
                              f"now: {free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs): other work holds the "
                              "cluster, or loading is slow (raise start_timeout_s)") from None
        except Exception as error:
            self.shutdown()
            raise _unwrap(error, "could not start") from None
        return self

    def shutdown(self) -> None:
        """Kill the stage actors (idempotent)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "PipelineExtractor":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def info(self) -> list[dict[str, Any]]:
        """Each started stage's ``StageWorker.info()`` now (peak RSS so far included)."""
        import ray

        return ray.get([actor.info.remote() for actor in self.actors])

    # ------------------------------------------------------------------------------- running
    def stream(self, batches: Iterable[tuple[Any, Sequence[Sequence[int]]]],
               pattern_width: int) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
        """Push ``(key, token_id_lists)`` micro-batches through the stages; yield ``(key, {layer: array})`` in order.

        Arrays have one row per prompt (pooled) or per real token (``pooling="none"``), in the
        micro-batch's order.
        """
        if not self.actors:
            raise RuntimeError("the pipeline stages are not running: use `with PipelineExtractor(...) as pipe:` "
                               "or call start() first")
        limit = self.options.max_in_flight or 2 * self.n_started
        pending: deque[tuple[Any, list[Any]]] = deque()
        for key, ids in batches:
            input_ids, mask = pad_batch(list(ids), self.tokenizer.pad_token_id, torch.device("cpu"))
            payload: Any = {"input_ids": input_ids, "attention_mask": mask, "pattern_width": int(pattern_width)}
            captured = []
            for actor in self.actors:
                payload, layer_ref = actor.forward.options(num_returns=2).remote(payload)
                captured.append(layer_ref)
            pending.append((key, captured))
            if len(pending) >= limit:
                yield self._collect(*pending.popleft())
        while pending:
            yield self._collect(*pending.popleft())

    def _collect(self, key: Any, captured: list[Any]) -> tuple[Any, dict[str, np.ndarray]]:
        import ray

        try:
            parts = ray.get(captured)
        except Exception as error:
            raise _unwrap(error, "failed") from None
        merged: dict[str, np.ndarray] = {}
        for part in parts:
            merged.update(part)
        return key, merged

    def plan(self, tokens: TokenizedPrompts, samples_per_shard: int | None = None) -> ExtractionPlan:
        """Like ``neuronmap.extraction.plan_extraction``, measured through the stages (no full model here)."""
        from neuronmap.extraction import _samples_per_shard

        probe = int(np.argmin(tokens.lengths))
        _key, arrays = next(self.stream([(None, [tokens.ids[probe]])], int(tokens.lengths.max())))
        shapes = {ref.name: tuple(arrays[ref.name].shape[1:]) for ref in self.refs}
        offsets = np.zeros(len(tokens.lengths) + 1, dtype=np.int64)
        np.cumsum(tokens.lengths, out=offsets[1:])
        if samples_per_shard is None:
            itemsize = torch.finfo(STORAGE_DTYPES[self.dtype]).bits // 8
            samples_per_shard = _samples_per_shard(shapes, float(tokens.lengths.mean()), self.pooling == "none",
                                                   itemsize)
        if samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard={samples_per_shard} must be >= 1")
        return ExtractionPlan(list(self.refs), shapes, {ref.name: ref.kind for ref in self.refs}, samples_per_shard,
                              offsets)

    def iter_shards(self, plan: Any, tokens: TokenizedPrompts, shards: Sequence[range], batch_size: int | None = None,
                    on_batch: Any = None) -> Iterator[tuple[range, dict[str, np.ndarray]]]:
        """Yield ``(samples, {layer: array})`` per shard, in the layout of ``extraction.extract_shard``.

        Rows come back in original sample order; micro-batches are the local engine's batches (length
        sorted inside each shard), and the pipe stays full across shard borders.
        ``plan`` is an ExtractionPlan or RunPlan (its ``shapes`` are used).
        """
        batch_size = batch_size or self.options.micro_batch_size
        if any(len(samples) == 0 for samples in shards):
            raise ConfigError("every shard must hold at least one sample; drop the empty ranges")
        per_token = self.pooling == "none"
        offsets = np.zeros(len(tokens.lengths) + 1, dtype=np.int64)
        np.cumsum(tokens.lengths, out=offsets[1:])
        dtype = np.float16 if self.dtype == "float16" else np.float32
        shapes = {name: tuple(shape) for name, shape in plan.shapes.items()}
        if set(shapes) != {ref.name for ref in self.refs}:
            raise ConfigError(f"the plan's layers ({', '.join(shapes)}) are not the pipeline's "
                              f"({', '.join(ref.name for ref in self.refs)}); start the pipeline with the plan's layers")
        batches = [(s, local) for s, samples in enumerate(shards)
                   for local in length_sorted_batches(tokens.lengths[samples.start:samples.stop], batch_size)]
        remaining = np.bincount([s for s, _ in batches], minlength=len(shards))
        outputs: dict[int, dict[str, np.ndarray]] = {}

        def feed() -> Iterator[tuple[Any, list[Sequence[int]]]]:
            current, ids = None, None
            for s, local in batches:  # in shard order: one shard's ids at a time (read from disk when spilled)
                if s != current:
                    current, ids = s, shard_ids(tokens.ids, shards[s].start, shards[s].stop)
                yield (s, local), [ids[i] for i in local]

        for (s, local), arrays in self.stream(feed(), int(tokens.lengths.max())):
            samples = shards[s]
            if s not in outputs:
                n_rows = int(offsets[samples.stop] - offsets[samples.start]) if per_token else len(samples)
                outputs[s] = {name: np.empty((n_rows, *shape), dtype=dtype) for name, shape in shapes.items()}
            out = outputs[s]
            index = local + samples.start
            for name, host in arrays.items():
                if per_token:
                    cursor = 0
                    for sample in index:
                        size, start = int(tokens.lengths[sample]), int(offsets[sample] - offsets[samples.start])
                        out[name][start:start + size] = host[cursor:cursor + size]
                        cursor += size
                else:
                    out[name][local] = host
            if on_batch is not None:
                on_batch(len(local))
            remaining[s] -= 1
            if remaining[s] == 0:
                yield samples, outputs.pop(s)


def _check_stage_resources(stages: int, cpus: float, gpus: float) -> None:
    """ConfigError when the stage actors could never all be scheduled (instead of pending forever)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    total_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    fit = sum(min(int(node.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else stages,
                  int(node.get("GPU", 0.0) / gpus + 1e-9) if gpus > 0 else stages) for node in nodes)
    if fit < stages:
        raise ConfigError(f"{stages} pipeline stages with {cpus:g} CPUs and {gpus:g} GPUs each do not fit the Ray "
                          f"cluster ({total_cpus:g} CPUs, {total_gpus:g} GPUs); ask for fewer stages or resources per "
                          "stage (--cpus-per-stage, --gpus-per-stage)")


def _unwrap(error: BaseException, doing: str) -> BaseException:
    """The stage's own WorkerError out of Ray's wrappers; other Ray errors as a WorkerError."""
    found = find_worker_error(error)
    if found is not None:
        return found
    return WorkerError(f"a pipeline stage {doing}: {' '.join(str(error).split())[:500]}", error)


def run_pipeline_extraction(model: Any, tokens: Any, plan: Any = None, shards: Sequence[range] | None = None, *,
                            layers: str | Sequence[str] = "blocks.*", pooling: str = "mean", dtype: str = "float32",
                            batch_size: int | None = None, samples_per_shard: int | None = None, max_length: int = 512,
                            options: PipelineOptions | None = None,
                            on_batch: Any = None) -> Iterator[tuple[range, dict[str, np.ndarray]]]:
    """Extract shards through K pipeline stages; yield ``(samples, {layer: array})`` like ``extract_shard``.

    model : folder, registry name, hub id or LoadedModel (only its ``source`` is used)
    tokens : TokenizedPrompts, or a list of texts / a DataFrame with ``text`` (tokenised to ``max_length``)
    plan : ExtractionPlan or RunPlan; its layers (``shapes``) replace ``layers``. None: planned here.
    shards : sample ranges to extract (default: every shard of the plan)
    batch_size : micro-batch size (default ``options.micro_batch_size``)

    The stage actors live for the duration of the iteration. Needs a connected Ray.
    """
    if plan is not None:
        layers = list(plan.shapes)
    extractor = PipelineExtractor(model, layers, pooling=pooling, dtype=dtype, options=options)
    with extractor:
        if not isinstance(tokens, TokenizedPrompts):
            texts = tokens["text"].tolist() if hasattr(tokens, "columns") else list(tokens)
            tokens = tokenize_prompts(extractor.tokenizer, texts, max_length)
        if plan is None:
            plan = extractor.plan(tokens, samples_per_shard)
        if shards is None:
            n, size = len(tokens.lengths), plan.samples_per_shard
            shards = [range(start, min(start + size, n)) for start in range(0, n, size)]
        yield from extractor.iter_shards(plan, tokens, shards, batch_size, on_batch)
