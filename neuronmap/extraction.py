"""In-process extraction: prompts -> tokens -> length-sorted batches -> hooked forward -> shards.

Why it is fast: the forward stops after the last requested layer (no LM head, no later blocks),
batches are sorted by length inside each shard so padding is small, pooling happens on the device
in the capture hook, and only the pooled rows are copied to the host.

Why memory stays flat: prompts are processed one shard at a time (`samples_per_shard` samples in
their original order). Within a shard they are sorted by length for batching, then put back in
original order and committed as one shard per layer. Nothing outside the current shard is held.

Why a crash loses nothing: each shard is committed atomically by the store and recorded in the
manifest; re-running the same command skips committed shards (resume).
"""

from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import contextlib
import copy
import itertools
import math
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .capture import Capture
from .errors import ConfigError
from .pooling import check_pooling, mean_pool, mean_weights, pool

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FORMATS = ("hdf5", "parquet")
# Target bytes of activations buffered per shard (all layers together) when the caller does not
# choose `samples_per_shard`: large enough for length sorting to pay off, small enough for laptops.
SHARD_TARGET_BYTES = 128 * 1024**2  # two are in memory at once: one computed, one being committed
# Per-token runs on a GPU are bound by the disk, not the forward, and every shard costs a fixed
# ~25 ms on top of its bytes (a file per layer to create, HDF5 metadata, fsyncs, a manifest rewrite):
# 16 shards of GPT-2 small's 12 layers stored at 0.81-1.09 of a raw write on an H200, 4 larger ones
# at 1.09-1.31. So they get 4x larger shards (2 x 512 MB of pinned host memory). Pooled runs keep
# 128 MB: they are bound by the forward, and larger shards would only lengthen the last commit,
# which nothing overlaps.
SHARD_TARGET_BYTES_GPU_PER_TOKEN = 512 * 1024**2
ENGINE_GROUP = "neuronmap.engines"


@dataclass
class TokenizedPrompts:
    """Token ids of every prompt, truncated to `max_length`, and how many were truncated."""

    ids: Sequence[Sequence[int]]  # PackedIds from tokenize_prompts; any sequence of id sequences works
    lengths: np.ndarray  # (n_samples,)
    n_truncated: int
    max_length: int


@dataclass
class ExtractionPlan:
    """What one extraction computes: resolved layers and their stored feature shapes."""

    refs: list[Any]
    shapes: dict[str, tuple[int, ...]]
    kinds: dict[str, str]
    samples_per_shard: int
    row_offsets: np.ndarray  # (n_samples + 1,) first row of each sample (per-token runs)


@dataclass
class RunPlan:
    """Everything a run's manifest and its shards need, without the model: picklable, so an engine
    can plan where the model is (a Ray task) and hand the plan to workers.

    ``lengths`` are the token counts of every prompt after truncation, in prompt order; the shard
    boundaries, the per-token row offsets and the attention-pattern width all follow from them.
    """

    model: str
    config_hash: str
    tokenizer: str
    source: str
    model_dtype: str
    shapes: dict[str, tuple[int, ...]]  # layer -> stored feature shape, in extraction order
    kinds: dict[str, str]
    samples_per_shard: int
    max_length: int
    lengths: np.ndarray  # (n_samples,)
    n_truncated: int

    @property
    def layers(self) -> list[str]:
        return list(self.shapes)

    @property
    def n_samples(self) -> int:
        return len(self.lengths)

    @property
    def pattern_width(self) -> int:
        """Key-axis width of stored attention patterns: the run's longest prompt."""
        return int(self.lengths.max())

    def shards(self) -> list[range]:
        """Sample ranges of the shards, in order: shard i holds samples [i*sps, (i+1)*sps)."""
        n, size = self.n_samples, self.samples_per_shard
        return [range(start, min(start + size, n)) for start in range(0, n, size)]

    @cached_property
    def row_offsets(self) -> np.ndarray:
        """(n_samples + 1,) first row of each sample in per-token layers; the last entry is n_tokens."""
        offsets = np.zeros(self.n_samples + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return offsets

    def first_row(self, sample: int, per_token: bool) -> int:
        """Row of `sample` in every layer: its position (pooled) or its first token's row (per token)."""
        return int(self.row_offsets[sample]) if per_token else sample


class PackedIds(collections.abc.Sequence):
    """The token ids of many prompts in one flat int32 array: `ids[i]` is prompt i's ids (a view).

    4 bytes a token, where Python lists of ints take ~36: at 100,000 prompts the ids were most of
    what a run's memory grew by with its number of prompts.
    """

    def __init__(self, flat: np.ndarray, lengths: np.ndarray):
        self.flat = np.ascontiguousarray(flat, dtype=np.int32)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        if self.offsets[-1] != len(self.flat):
            raise ValueError(f"{len(self.flat)} ids for lengths summing to {self.offsets[-1]}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"prompt {index} out of range for {len(self)} prompts")
        return self.flat[self.offsets[index] : self.offsets[index + 1]]

    def slice(self, start: int, stop: int) -> PackedIds:
        """Prompts `start..stop-1` as their own PackedIds (views, no copy)."""
        lengths = np.diff(self.offsets[start : stop + 1])
        return PackedIds(self.flat[self.offsets[start] : self.offsets[stop]], lengths)


class SpilledIds(PackedIds):
    """Token ids kept in a file (flat int32, prompt after prompt) instead of memory.

    `slice(start, stop)` reads just those prompts' ids, so an extraction holds one shard's ids at a
    time whatever the number of prompts; the file is written once by `tokenize_batches`.
    """

    def __init__(self, path: Path, lengths: np.ndarray):
        self.path = Path(path)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        size = self.path.stat().st_size
        if size != 4 * self.offsets[-1]:
            raise ValueError(f"{self.path} holds {size // 4} ids for lengths summing to {self.offsets[-1]}")

    def _read(self, first: int, count: int) -> np.ndarray:
        return np.fromfile(self.path, dtype=np.int32, count=count, offset=4 * first)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index) + (len(self) if int(index) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"prompt {index} out of range for {len(self)} prompts")
        return self._read(int(self.offsets[index]), int(self.offsets[index + 1] - self.offsets[index]))

    def slice(self, start: int, stop: int) -> PackedIds:
        first, last = int(self.offsets[start]), int(self.offsets[stop])
        return PackedIds(self._read(first, last - first), np.diff(self.offsets[start : stop + 1]))


def shard_ids(ids: Sequence[Sequence[int]], start: int, stop: int) -> Sequence[Sequence[int]]:
    """The ids of prompts `start..stop-1`, indexed from 0: read from disk for SpilledIds."""
    return ids.slice(start, stop) if isinstance(ids, PackedIds) else ids[start:stop]


def tokenize_prompts(tokenizer: Any, texts: Sequence[str], max_length: int,
                     on_batch: Callable[[int], None] | None = None, threads: int = 1) -> TokenizedPrompts:
    """Tokenise `texts` in memory (`PackedIds`); see `tokenize_batches`."""
    step = 1024
    return tokenize_batches(tokenizer, (list(texts[start : start + step]) for start in range(0, len(texts), step)),
                            max_length, on_batch=on_batch, threads=threads)


def tokenize_threads() -> int:
    """Threads for tokenising a whole prompt set: the CPU threads torch was given here (Ray sets them to
    a task's CPUs), at most 8, beyond which the reading of prompts is the limit."""
    return max(1, min(8, torch.get_num_threads()))


def tokenize_batches(tokenizer: Any, batches: Iterable[Sequence[str]], max_length: int,
                     spill: Path | None = None, on_batch: Callable[[int], None] | None = None,
                     threads: int = 1) -> TokenizedPrompts:
    """Tokenise once, without padding; count the prompts that `max_length` cut short.

    Only prompts that reach `max_length` are re-tokenised without truncation to tell whether they
    were really cut, so the common case costs one pass. The ids are packed a batch of texts at a
    time, so the tokenizer's Python lists never exist for more than one batch. With `spill`, the
    packed ids go to that file (`SpilledIds`) and memory holds only the lengths. `on_batch(n)` is
    called after each batch of n prompts (a progress bar). The ids are the tokenizer's own, read
    with less Python per prompt where it is a fast one (`token_ids.ids_encoder`).

    `threads` > 1 encodes batches on that many threads (a fast tokenizer releases the GIL while it
    encodes: 2 threads tokenise 100,000 prompts in about half the time on 2 CPUs), at most 2 batches
    per thread ahead of the one being packed, so memory stays bounded; results keep their order.
    """
    from .token_ids import can_share_across_threads, ids_encoder

    encode = ids_encoder(tokenizer, max_length)
    if threads > 1 and not can_share_across_threads(tokenizer):
        threads = 1
    untruncated = _Untruncated(tokenizer, max_length, encode if threads == 1 else None)

    def one(chunk: Sequence[str]) -> tuple[int, np.ndarray, np.ndarray, int]:
        chunk = list(chunk)
        encoded = encode(chunk, True)
        at_limit = [i for i, seq in enumerate(encoded) if len(seq) >= max_length]
        cut = 0
        if at_limit:
            full = untruncated([chunk[i] for i in at_limit])
            cut = sum(len(seq) > max_length for seq in full)
        sizes = np.fromiter((len(seq) for seq in encoded), dtype=np.int64, count=len(encoded))
        packed = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(sizes.sum()))
        return len(chunk), sizes, packed, cut

    flat: list[np.ndarray] = []
    lengths_parts: list[np.ndarray] = []
    n_truncated = 0
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(spill, "wb")) if spill is not None else None
        for n_chunk, sizes, packed, cut in _ordered_map(one, batches, threads):
            n_truncated += cut
            if on_batch is not None:
                on_batch(n_chunk)
            lengths_parts.append(sizes)
            if sink is not None:
                sink.write(packed.data)  # not tofile: its error on a full disk carries no errno
            else:
                flat.append(packed)
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, dtype=np.int64)
    if len(lengths) and lengths.min() == 0:
        empty = int(np.argmin(lengths))
        raise ConfigError(f"prompt {empty} tokenises to no tokens; remove it or fix the tokenizer")
    if spill is not None:
        return TokenizedPrompts(SpilledIds(spill, lengths), lengths, n_truncated, max_length)
    ids = PackedIds(np.concatenate(flat) if flat else np.zeros(0, dtype=np.int32), lengths)
    return TokenizedPrompts(ids, lengths, n_truncated, max_length)


class _Untruncated:
    """Encodes without truncation, to tell which prompts at `max_length` were really cut.

    Serially the one encoder switches truncation off and on again. With threads it must not: a fast
    tokenizer's truncation is state of its backend, shared by every thread, so the untruncated
    encodes go to a copy of the tokenizer, made the first time a prompt reaches the limit.
    """

    def __init__(self, tokenizer: Any, max_length: int, serial: Callable | None) -> None:
        self._tokenizer, self._max_length, self._encode = tokenizer, max_length, serial
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list:
        if self._encode is None:
            with self._lock:
                if self._encode is None:
                    from .token_ids import ids_encoder

                    self._encode = ids_encoder(copy.deepcopy(self._tokenizer), self._max_length)
        return self._encode(texts, False)


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """`map(fn, items)` on `threads` threads, in order, with at most 2 x threads items in flight.

    The first item runs on the calling thread before any other starts (the encoder checks its fast
    path on its first call: one thread decides it).
    """
    iterator = iter(items)
    for first in iterator:
        yield fn(first)
        break
    if threads <= 1:
        yield from map(fn, iterator)
        return
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="neuronmap-tokenize")
    pending: collections.deque = collections.deque()
    try:
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Yield index arrays of at most `batch_size`, longest first, so padding stays small."""
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences (lists or arrays) into (input_ids, attention_mask) on `device`.

    On CUDA the host tensors are pinned and copied without blocking, so building the next batch
    never waits for the GPU to finish the current one.
    """
    width = max(len(seq) for seq in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return to_device(input_ids, device), to_device(mask, device)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`; pinned and non-blocking on CUDA (ordered on the stream)."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def real_token_index(lengths: Sequence[int], width: int) -> np.ndarray:
    """Flat positions (row * width + position) of the real tokens of a right-padded batch, row-major.

    `hidden.flatten(0, 1)[index]` equals `hidden[mask.bool()]` but needs no device-to-host sync
    (boolean indexing must first count the selected rows on the device).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.repeat(np.arange(len(lengths), dtype=np.int64) * width, lengths)
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts + within


class BatchPooler:
    """The capture transform: shape-checks a hooked tensor, pools it and casts it, on the device.

    Attention patterns (batch, heads, q, k) are turned into (batch, q, heads, max_len) with the key
    axis zero-padded to the run's longest prompt, so they pool over query tokens like any layer
    and every row has the same shape.
    """

    def __init__(self, pooling: str, storage_dtype: torch.dtype, pattern_width: int) -> None:
        self.pooling = pooling
        self.storage_dtype = storage_dtype
        self.pattern_width = pattern_width
        self.mask = None
        self.token_rows: torch.Tensor | None = None  # `real_token_index` of the batch, for pooling "none"
        self._scratch: torch.Tensor | None = None  # float32 copy of a half-precision layer (mean pooling)

    @property
    def mask(self) -> torch.Tensor | None:
        """The batch's attention mask (batch, seq); set before each forward."""
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._mask = value
        self._mean_weights: torch.Tensor | None = None  # `mean_weights` of this mask, made by the first layer

    def __call__(self, ref: Any, tensor: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None, "BatchPooler.mask must be set before each forward"
        batch, seq = self.mask.shape
        if ref.kind == "pattern":
            tensor = tensor.permute(0, 2, 1, 3)
            tensor = torch.nn.functional.pad(tensor, (0, self.pattern_width - tensor.shape[-1]))
        if tensor.dim() < 3 or tuple(tensor.shape[:2]) != (batch, seq):
            raise ConfigError(
                f"layer {ref.name!r} produced shape {tuple(tensor.shape)}, not (batch={batch}, seq={seq}, ...);"
                " only token-aligned layers can be extracted, pick another layer"
            )
        if tensor.dtype in (torch.float16, torch.bfloat16):  # pooled in float32
            tensor = self._float32_scratch(tensor) if self.pooling == "mean" else tensor.float()
        if self.pooling == "none" and self.token_rows is not None:
            return tensor.flatten(0, 1).index_select(0, self.token_rows).to(self.storage_dtype)
        if self.pooling == "mean":  # one set of weights per batch for every layer
            cached = self._mean_weights
            if cached is None or cached.dtype != tensor.dtype or cached.device != tensor.device:
                self._mean_weights = mean_weights(self.mask.to(tensor.device), tensor.dtype)
            return mean_pool(tensor, self._mean_weights).to(self.storage_dtype)
        return pool(tensor, self.mask, self.pooling).to(self.storage_dtype)

    def _float32_scratch(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in float32, in one buffer reused by every layer (mean pooling only: its `bmm` output is
        new, so nothing keeps the buffer). A fresh `.float()` per layer is fresh memory per layer: on a
        CPU its first touch cost more than the pooling (benchmarks/pooling.py, bfloat16)."""
        scratch = self._scratch
        if scratch is None or scratch.numel() < tensor.numel() or scratch.device != tensor.device:
            scratch = self._scratch = torch.empty(tensor.numel(), dtype=torch.float32, device=tensor.device)
        out = scratch[: tensor.numel()].view(tensor.shape)
        out.copy_(tensor)
        return out


def shard_target_bytes(device: Any, per_token: bool) -> int:
    """Bytes of activations per shard when the caller does not choose: see SHARD_TARGET_BYTES_GPU_PER_TOKEN."""
    if per_token and torch.device(device).type == "cuda":
        return SHARD_TARGET_BYTES_GPU_PER_TOKEN
    return SHARD_TARGET_BYTES


def _samples_per_shard(shapes: dict[str, tuple[int, ...]], mean_tokens: float, per_token: bool, itemsize: int,
                       target_bytes: int = SHARD_TARGET_BYTES) -> int:
    row_bytes = sum(int(np.prod(shape)) for shape in shapes.values()) * itemsize
    per_sample = row_bytes * (mean_tokens if per_token else 1.0)
    return int(np.clip(target_bytes // max(per_sample, 1), 64, 8192))


def plan_extraction(
    loaded: Any, layers: str | Sequence[str], pooling: str, storage_dtype: torch.dtype,
    tokens: TokenizedPrompts, samples_per_shard: int | None,
) -> ExtractionPlan:
    """Resolve layers and measure each one's stored shape with one forward on the shortest prompt."""
    adapter = loaded.adapter
    refs = adapter.resolve(layers)
    width = int(tokens.lengths.max())
    probe = int(np.argmin(tokens.lengths))
    pooler = BatchPooler("first", storage_dtype, width)
    input_ids, mask = pad_batch([tokens.ids[probe]], loaded.tokenizer.pad_token_id, loaded.device)
    pooler.mask = mask
    with torch.inference_mode(), adapter.attention_patterns(refs), Capture(refs, pooler, stop_early=True) as cap:
        cap.run(adapter.forward, input_ids, mask, refs)
    if cap.missing():
        raise ConfigError(f"layers {', '.join(cap.missing())} did not run in a forward pass of {loaded.name}; pick others")
    shapes = {ref.name: tuple(cap.outputs[ref.name].shape[1:]) for ref in refs}
    kinds = {ref.name: ref.kind for ref in refs}
    offsets = np.zeros(len(tokens.lengths) + 1, dtype=np.int64)
    np.cumsum(tokens.lengths, out=offsets[1:])
    per_token = pooling == "none"
    if samples_per_shard is None:
        itemsize = torch.finfo(storage_dtype).bits // 8
        samples_per_shard = _samples_per_shard(shapes, float(tokens.lengths.mean()), per_token, itemsize,
                                               shard_target_bytes(loaded.device, per_token))
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard={samples_per_shard} must be >= 1")
    return ExtractionPlan(refs, shapes, kinds, samples_per_shard, offsets)


class HostBuffers:
    """Reused host memory (pinned when `pin`) that shards are copied into off the device, or (on the
    CPU) assembled in directly.

    Why: `.cpu()` of a 128 MB shard into fresh pageable memory ran at 1.5 GB/s on an H200, every
    page faulted in on first touch; into reused pageable memory at 9.6 GB/s, reused pinned at 50 GB/s
    (`benchmarks/d2h_copy.py`). On the CPU a fresh shard is the same first touch, paid while the rows
    are scattered into it. Two sets alternate, because `BackgroundCommits` keeps one commit in
    flight: the shard being committed keeps its set while the next shard is filled in the other.
    A set grows when a shard needs more rows (per-token shards differ in size) and is then reused.
    """

    def __init__(self, pin: bool, sets: int = 2) -> None:
        self.pin = pin
        self._sets: list[dict[str, torch.Tensor]] = [{} for _ in range(sets)]
        self._next = 0

    def take(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """Tensors of these (shape, dtype) in the next buffer set (valid until that set's next use)."""
        chosen = self._sets[self._next]
        self._next = (self._next + 1) % len(self._sets)
        views = {}
        for name, (shape, dtype) in specs.items():
            numel = math.prod(shape)
            buffer = chosen.get(name)
            if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
                buffer = chosen[name] = torch.empty(numel, dtype=dtype, pin_memory=self.pin)
            views[name] = buffer[:numel].view(shape)
        return views

    def copy(self, tensors: dict[str, torch.Tensor], wait: bool = True) -> collections.abc.Mapping[str, np.ndarray]:
        """The tensors copied into the next buffer set, as numpy views of it (valid until that set's next use).

        With `wait=False` a copy off the GPU is only queued: the result is `LandingArrays`, which waits
        for it on first access (see there).
        """
        views = self.take({name: (tuple(t.shape), t.dtype) for name, t in tensors.items()})
        for name, tensor in tensors.items():
            views[name].copy_(tensor, non_blocking=self.pin)
        arrays = {name: view.numpy() for name, view in views.items()}
        if self.pin and any(t.is_cuda for t in tensors.values()):
            landed = torch.cuda.Event()
            landed.record()  # after the copies on the current stream
            if not wait:
                return LandingArrays(arrays, landed.synchronize)
            landed.synchronize()  # the non-blocking copies have landed
        return arrays


class LandingArrays(collections.abc.Mapping):
    """Layer -> numpy array, read only once a queued device-to-host copy has landed.

    Why: waiting for a shard's copy at the end of `extract_shard` made the host wait until the GPU
    had finished every batch of the shard, so the GPU then sat idle while the host prepared and
    launched the next shard's first batch. On an H100 a 1B Llama, batch 256, took 0.92 s for 4,096
    prompts in one shard and ~1.5 s in the 6 shards a run makes (`benchmarks/gpu_gap.py`). With the
    copy only queued, the host goes straight on to the next shard and whoever reads the arrays (the
    commit thread) waits, off the GIL. The names are known at once; the first value read waits.
    """

    def __init__(self, arrays: dict[str, np.ndarray], wait: Callable[[], None]) -> None:
        self._arrays = arrays
        self._wait: Callable[[], None] | None = wait

    def _landed(self) -> dict[str, np.ndarray]:
        wait = self._wait
        if wait is not None:
            wait()
            self._wait = None
        return self._arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self._landed()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def extract_shard(
    loaded: Any, plan: ExtractionPlan, tokens: TokenizedPrompts, samples: range, pooler: BatchPooler,
    batch_size: int, on_batch: Callable[[int], None] | None = None, host: HostBuffers | None = None,
    wait: bool = True,
) -> collections.abc.Mapping[str, np.ndarray]:
    """Extract the samples of one shard; rows come back in original sample order.

    Returns a mapping layer -> array of shape (n_rows, *feature), where n_rows is the number of
    samples (pooled) or of real tokens (pooling "none"). With `host`, the arrays are views of its
    reused buffers (see `HostBuffers`), else new arrays. With `host` on a GPU and `wait=False`, the
    copy off the device is only queued and reading the arrays waits for it (`LandingArrays`).
    """
    adapter = loaded.adapter
    device = torch.device(loaded.device)
    per_token = pooler.pooling == "none"
    first, last = samples.start, samples.stop
    row_base = plan.row_offsets[first] if per_token else first
    n_rows = int(plan.row_offsets[last] - plan.row_offsets[first]) if per_token else last - first
    # The shard is assembled on the device and copied to the host once at the end: no per-batch
    # sync, so on a GPU the next batch is queued while the current one runs. On the CPU it is
    # assembled in `host`'s reused memory: nothing to copy, and no fresh pages to fault in.
    shapes = {name: (n_rows, *shape) for name, shape in plan.shapes.items()}
    in_place = host is not None and device.type == "cpu"
    if in_place:
        out = host.take({name: (shape, pooler.storage_dtype) for name, shape in shapes.items()})
    else:
        out = {name: torch.empty(shape, dtype=pooler.storage_dtype, device=device) for name, shape in shapes.items()}
    lengths = tokens.lengths[first:last]
    ids = shard_ids(tokens.ids, first, last)
    with torch.inference_mode(), adapter.attention_patterns(plan.refs), Capture(plan.refs, pooler, stop_early=True) as cap:
        for local in length_sorted_batches(lengths, batch_size):
            index = local + first
            batch_lengths = tokens.lengths[index]
            input_ids, mask = pad_batch([ids[i] for i in local], loaded.tokenizer.pad_token_id, device)
            pooler.mask = mask
            if per_token:
                pooler.token_rows = to_device(real_token_index(batch_lengths, input_ids.shape[1]), device)
                starts = plan.row_offsets[index] - row_base
                rows = np.repeat(starts, batch_lengths) + real_token_index(batch_lengths, 0)
            else:
                rows = local.astype(np.int64)
            rows_t = to_device(np.ascontiguousarray(rows, dtype=np.int64), device)
            cap.run(adapter.forward, input_ids, mask, plan.refs)
            for name, value in cap.outputs.items():
                out[name].index_copy_(0, rows_t, value.to(device, non_blocking=True))
            if on_batch is not None:
                on_batch(len(index))
    pooler.token_rows = None
    if host is not None and not in_place:
        return host.copy(out, wait=wait)
    return {name: tensor.cpu().numpy() for name, tensor in out.items()}


def commit_shard(writer: Any, index: int, samples: range, row_start: int, arrays: collections.abc.Mapping[str, np.ndarray],
                 sample_ids: np.ndarray, lengths: np.ndarray, per_token: bool) -> list[Any]:
    """Commit shard `index` (samples `samples`, rows from `row_start`) of every layer not yet committed.

    sample_ids, lengths : ndarray of shape (len(samples),), the shard's prompts' ids and token counts
    arrays : layer -> ndarray of shape (n_rows, *feature), as `extract_shard` returns it
    Returns the ShardRecords written (layers already committed are skipped, so a retried shard
    neither duplicates nor loses rows).
    """
    if per_token:
        rows = (row_start, row_start + int(lengths.sum()))
        ids = np.repeat(sample_ids, lengths)
        token_index = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    else:
        rows = (samples.start, samples.stop)
        ids, token_index = sample_ids, None
    todo = {name: array for name, array in arrays.items() if not writer.committed(name, index)}
    return writer.write_shards(index, rows=rows, samples=(samples.start, samples.stop), arrays=todo,
                               sample_ids=ids, token_index=token_index)


def plan_run(
    loaded: Any, texts: Any, layers: str | Sequence[str], pooling: str, dtype: str, max_length: int,
    samples_per_shard: int | None, on_tokenized: Callable[[int], None] | None = None,
) -> tuple[RunPlan, TokenizedPrompts, ExtractionPlan]:
    """Tokenise every prompt and plan the run (layers, shapes, shard size) where the model is loaded.

    `texts` is a sequence of strings, or anything with `text_batches()`: a `StagedPrompts` table is
    read a batch at a time and its token ids spill to a file beside it, so memory holds only the lengths.
    `on_tokenized(n)` is called as batches of n prompts are tokenised (a progress bar).
    """
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(loaded.model.config, "n_positions", None)
    if limit and max_length > limit:
        max_length = int(limit)
    if hasattr(texts, "text_batches"):  # a stored table: ids spill beside it; other batch sources keep them
        path = getattr(texts, "path", None)
        spill = Path(path).parent / "token-ids.int32" if path is not None else None
        try:
            tokens = tokenize_batches(loaded.tokenizer, texts.text_batches(), max_length, spill=spill,
                                      on_batch=on_tokenized, threads=tokenize_threads())
        except OSError as error:  # a full disk while spilling: one line, as for shards
            from .store.manifest import storage_error

            raise storage_error(error, spill) from None
    else:
        tokens = tokenize_prompts(loaded.tokenizer, list(texts), max_length, on_batch=on_tokenized,
                                  threads=tokenize_threads())
    plan = plan_extraction(loaded, layers, pooling, STORAGE_DTYPES[dtype], tokens, samples_per_shard)
    run_plan = RunPlan(
        model=str(loaded.name), config_hash=loaded.config_hash, tokenizer=loaded.tokenizer.name_or_path,
        source=str(loaded.source), model_dtype=str(loaded.dtype).replace("torch.", ""), shapes=plan.shapes,
        kinds=plan.kinds, samples_per_shard=plan.samples_per_shard, max_length=max_length, lengths=tokens.lengths,
        n_truncated=tokens.n_truncated)
    return run_plan, tokens, plan


def new_manifest(plan: RunPlan, prompts: Any, source_hash: str, pooling: str, dtype: str, format: str,
                 compression: str | None, batch_size: int) -> Any:
    """The manifest of a run planned by `plan` (the same for every engine).

    source_hash : the prompt table's `prompt_source_hash` (`StagedPrompts.source_hash`)
    """
    from .store import Manifest

    return Manifest.new(
        model=plan.model, config_hash=plan.config_hash, tokenizer=plan.tokenizer,
        layers={name: dict(shape=list(shape), dtype=dtype, kind=plan.kinds[name], per_token=pooling == "none")
                for name, shape in plan.shapes.items()},
        pooling=pooling, dtype=dtype, format=format, compression=compression,
        prompt_source=str(prompts) if isinstance(prompts, (str, Path)) else "<memory>",
        prompt_source_hash=source_hash, n_samples=plan.n_samples,
        n_tokens=int(plan.lengths.sum()), n_truncated=plan.n_truncated, max_length=plan.max_length,
        extra={"samples_per_shard": plan.samples_per_shard, "batch_size": batch_size, "source": plan.source,
               "model_dtype": plan.model_dtype},
    )


def default_out(model_name: str) -> Path:
    """`runs/<model>-<timestamp>`: where a run goes when the caller names no folder."""
    return Path("runs") / f"{Path(str(model_name)).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def engine_names() -> list[str]:
    """`local` plus every engine installed under the `neuronmap.engines` entry point group."""
    from importlib.metadata import entry_points

    return ["local", *sorted({point.name for point in entry_points(group=ENGINE_GROUP)} - {"local"})]


def load_engine(engine: str) -> Callable[..., Any]:
    """The run function of an installed engine (`neuronmap.engines` entry point), e.g. `ray`.

    The core never imports an engine's package itself: packages such as `actors` register one, so
    neuronmap stays importable without Ray.
    """
    from importlib.metadata import entry_points

    points = [point for point in entry_points(group=ENGINE_GROUP) if point.name == engine]
    if not points:
        raise ConfigError(f"engine={engine!r} is not installed; use one of {', '.join(engine_names())} "
                          f"(engines register under the {ENGINE_GROUP!r} entry point group)")
    try:
        return points[0].load()
    except ImportError as error:
        raise ConfigError(f"engine {engine!r} cannot be loaded ({error}); install its dependencies "
                          "(for ray: pip install 'ray[default,data]==2.60.0') or use --engine local") from None


@contextlib.contextmanager
def preparation_progress(enabled: bool) -> Iterator[Callable[..., Callable[[int], None]]]:
    """Transient bars for the steps before the first forward (reading the prompts, tokenising them),
    which take seconds at 100,000s of prompts: `task(description, total=None)` gives an `advance(n)`.
    The bars vanish when done, and print nothing where the output is not a terminal."""
    from rich import get_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True, disable=not (enabled and get_console().is_terminal))  # else a blank line

    def finish_all() -> None:  # the steps run one after another: a new one means the others are done
        for step in progress.tasks:
            progress.update(step.id, total=step.completed)

    def task(description: str, total: int | None = None) -> Callable[[int], None]:
        finish_all()
        task_id = progress.add_task(description, total=total)
        return lambda n: progress.advance(task_id, n)

    with progress:
        yield task
        finish_all()


def progress_bar(enabled: bool, total: int, description: str) -> contextlib.AbstractContextManager:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class _Rate(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task: Any) -> Any:  # samples/s from rich's own speed estimate
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} samples/s" if speed else "-- samples/s")

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
    progress.add_task(description, total=total)
    return progress


def extract(
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
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    stages: int | None = None,
    cpus_per_stage: float | None = None,
    gpus_per_stage: float | None = None,
) -> Any:
    """Extract activations of `layers` for every prompt and store them as a run at `out`.

    Parameters
    ----------
    model : str, path or LoadedModel
        Registry name (`gpt2`, `all-minilm-l6-v2`), local folder, hub id, or an already loaded model.
    prompts : path, list of str or pandas.DataFrame
        .txt/.jsonl/.csv/.parquet file, or texts in memory; label columns are kept in the run.
    layers : str or list of str
        Canonical names, globs and ranges: `blocks.*`, `blocks.0-5.mlp`, `final`, `module:<path>`.
    out : path or str
        Run directory. Default `runs/<model>-<timestamp>`. `s3://bucket/prefix` writes a Parquet run to
        object storage through a local staging folder (`neuronmap.store.remote`).
    pooling : {"mean", "last", "first", "max", "none"}
        How tokens are pooled; `none` stores one row per real token with its `token_index`.
    format : {"hdf5", "parquet"}
    dtype : {"float32", "float16"}
        Storage dtype (the cast happens on the device).
    batch_size, max_length : int
        Prompts per forward pass; tokens per prompt (longer prompts are truncated and counted).
    samples_per_shard : int, optional
        Samples per shard; by default chosen so a shard buffers about 128 MB (one shard is computed
        while the previous one is stored), 512 MB for per-token runs on CUDA (`shard_target_bytes`).
    engine : {"local", "ray", ...}
        `local` runs in this process; other engines are looked up in the `neuronmap.engines` entry
        point group (`ray`: a Ray Data pipeline over an actor pool, from the `actors` package). Every
        engine produces the same run (same rows, values and manifest apart from timings).
    address, workers, cpus_per_worker, gpus_per_worker
        Options of the distributed engines: cluster address (`auto`, `HOST:PORT`, `ray://...`; none
        starts an embedded local cluster), number of workers, CPUs and GPUs reserved per worker.
    stages, cpus_per_stage, gpus_per_stage
        Pipeline parallelism on the `ray` engine: the model cut into `stages` contiguous block ranges,
        one actor each, with these CPUs and GPUs reserved per stage (instead of a worker pool).

    Returns
    -------
    Run
        The completed run, opened (`run.array(layer)`, `run.prompts`, ...).
    """
    from .models import LoadedModel, load_model
    from .prompt_table import stage_prompts, staging_folder  # here, not at import: pandas stays out of stage actors
    from .store import RunWriter, open_run

    check_pooling(pooling)
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not supported; use one of {', '.join(FORMATS)}")
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported for storage; use one of {', '.join(STORAGE_DTYPES)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if max_length < 2:
        raise ConfigError(f"max_length={max_length} must be >= 2")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if out is not None and not str(out).strip():
        raise ConfigError("out is empty: give the run folder, e.g. out='runs/my-run' (--out runs/my-run)")

    cluster = {"address": address, "workers": workers, "cpus_per_worker": cpus_per_worker,
               "gpus_per_worker": gpus_per_worker, "stages": stages, "cpus_per_stage": cpus_per_stage,
               "gpus_per_stage": gpus_per_stage}
    given = {name: value for name, value in cluster.items() if value is not None}
    if engine == "local" and given:
        raise ConfigError(f"{', '.join(given)} only apply to a distributed engine; pass engine='ray' (--engine ray) "
                          "or leave them out for the local engine")
    run_engine = load_engine(engine) if engine != "local" else None
    options = dict(model=model, prompts=prompts, layers=layers, pooling=pooling, format=format, dtype=dtype,
                   batch_size=batch_size, max_length=max_length, device=device, model_dtype=model_dtype,
                   compression=compression, overwrite=overwrite, text_column=text_column,
                   samples_per_shard=samples_per_shard, progress=progress)
    from .store.remote import is_remote

    if is_remote(out):  # object storage: this function writes a local staging run, mirrored to the bucket
        from .store.remote import extract_to_remote

        return extract_to_remote(extract, out, engine=engine, **options, **given)
    if run_engine is not None:
        return run_engine(out=out, **options, **given)  # only the cluster options given: engines may lack some

    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=model_dtype)
    out = Path(out) if out is not None else default_out(loaded.name)
    with staging_folder(out) as staging:  # the prompt table and token ids on disk, not in memory
        with preparation_progress(progress) as task:
            staged = stage_prompts(prompts, staging, text_column=text_column, on_rows=task("read prompts"))
            run_plan, tokens, plan = plan_run(loaded, staged, layers, pooling, dtype, max_length, samples_per_shard,
                                              on_tokenized=task("tokenize", staged.n_samples))
        manifest = new_manifest(run_plan, prompts, staged.source_hash, pooling, dtype, format, compression,
                                batch_size)
        writer = RunWriter(out, manifest, format=format, compression=compression, overwrite=overwrite)
        writer.adopt_prompts(staged.path)
        _extract_shards(loaded, writer, run_plan, plan, tokens, pooling, dtype, batch_size, progress)
    return open_run(out)


def _extract_shards(loaded: Any, writer: Any, run_plan: RunPlan, plan: ExtractionPlan, tokens: TokenizedPrompts,
                    pooling: str, dtype: str, batch_size: int, progress: bool) -> None:
    """Compute and commit every shard the run at `writer` lacks, then mark it complete (local engine)."""
    from .store.background import BackgroundCommits

    per_token = pooling == "none"
    pooler = BatchPooler(pooling, STORAGE_DTYPES[dtype], pattern_width=run_plan.pattern_width)
    # On a GPU shards land in reused pinned buffers; on the CPU they are assembled in reused memory.
    host = HostBuffers(pin=torch.device(loaded.device).type == "cuda")
    try:
        with progress_bar(progress, run_plan.n_samples, f"extract {loaded.name}") as bar, \
                BackgroundCommits() as commits:  # shard N is stored while shard N+1 is computed
            for index, samples in enumerate(run_plan.shards()):
                if all(writer.committed(name, index) for name in plan.shapes):
                    bar.advance(0, len(samples))
                    continue
                arrays = extract_shard(loaded, plan, tokens, samples, pooler, batch_size,  # landing on a GPU
                                       on_batch=lambda n: bar.advance(0, n), host=host, wait=False)
                commits.submit(commit_shard, writer, index, samples, run_plan.first_row(samples.start, per_token),
                               arrays, np.arange(samples.start, samples.stop, dtype=np.int64),
                               tokens.lengths[samples.start : samples.stop], per_token)
        writer.complete()
    except KeyboardInterrupt:
        raise
    except Exception as error:  # the run stays resumable; mark why it stopped
        with contextlib.suppress(Exception):
            writer.fail(f"{type(error).__name__}: {error}")
        raise
