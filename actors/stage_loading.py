"""Build one pipeline stage's slice of a model, reading only the weights that slice owns.

Why not ``from_pretrained`` then drop layers: a stage of a model too large for one device must never
hold the whole model, not even briefly. So a stage

1. builds the base model's skeleton on the ``meta`` device from its config (no memory, no init),
2. replaces every module it does not own with a ``NotInStage`` placeholder (blocks outside its range,
   the embeddings unless it is the first stage, the final norm unless it is the last, and modules no
   stage runs, such as BERT's pooler),
3. materialises what is left on its device (``to_empty``) and recomputes the non-persistent buffers
   (rotary ``inv_freq``, BERT's ``position_ids``...) with the model's own ``_init_weights``, the same
   recipe ``from_pretrained`` uses after its own meta-device init,
4. copies each owned tensor from the checkpoint's safetensors file(s) with ``safe_open``, one tensor at
   a time (peak memory: the owned weights plus one tensor), and checks that every owned weight was
   found (strict for the owned part, whatever else the checkpoint holds).

Checkpoint keys are matched with or without the base-model prefix (``h.0.attn...`` in a ``GPT2Model``
checkpoint, ``transformer.h.0.attn...`` in a ``GPT2LMHeadModel`` one), through
``model.safetensors.index.json`` for sharded checkpoints, and with the legacy LayerNorm names
``gamma``/``beta`` of old BERT checkpoints.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuronmap.errors import ConfigError, UnknownModelError
from neuronmap.models.architectures import find_spec, get_path

from .stage_runners import get_runner

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Bytes copied from one opening of a safetensors file before it is closed and reopened (see
# load_owned_weights): bounds the mapped pages a load keeps resident.
_REOPEN_BYTES = 64 * 1024**2
_CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")


class NotInStage(nn.Module):
    """Placeholder for a module that lives in another stage (or in none); calling it is a bug."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.what} is not held by this pipeline stage")

    def extra_repr(self) -> str:
        return self.what


@dataclass
class StageLoadReport:
    """What a stage loaded: its block range, the checkpoint keys it read and its parameter count."""

    blocks: range
    first: bool
    last: bool
    device: str
    dtype: str
    loaded_keys: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    n_params: int = 0


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The local folder holding the model's config and safetensors files.

    A folder is used as is; a registry name or hub id goes through the Hugging Face cache (offline when
    ``HF_HUB_OFFLINE`` is set), fetching only configs, tokenizer files and safetensors.
    """
    from neuronmap.models.loading import _resolve

    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"folder {str(name_or_path)!r} has no config.json: not a transformers model folder")
        return path.resolve()
    _name, source, _entry = _resolve(str(name_or_path))
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=list(_CHECKPOINT_FILES)))
    except Exception as exc:  # hub errors have many types; the message is what the user needs
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UnknownModelError(f"cannot fetch model {source!r} for the pipeline stages: {reason}") from exc


def load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def checkpoint_index(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, for single-file and sharded (``*.index.json``) checkpoints."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {key: single for key in handle.keys()}
    raise ConfigError(f"no safetensors checkpoint in {folder} (model.safetensors or model.safetensors.index.json): "
                      "pipeline stages read weights with safetensors; re-save the model with "
                      "model.save_pretrained(folder)")


def model_dtype(config: Any, dtype: str, device: torch.device) -> torch.dtype:
    """Like ``load_model``: "auto" keeps the checkpoint dtype on CUDA and uses float32 on CPU."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"model dtype {dtype!r} is not supported: use auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = _DTYPES.get(saved)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def meta_model(config: Any, attn_implementation: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The base model (``AutoModel``) of ``config`` on the meta device: structure only, no memory."""
    import copy

    from transformers import AutoModel

    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    with torch.device("meta"):
        model = AutoModel.from_config(copy.deepcopy(config), **kwargs)
    return model.eval()


def blocks_path(model: nn.Module) -> str:
    """Dotted path of the block list in the base model (``h``, ``layers``, ``encoder.layer``...)."""
    spec = find_spec(model, getattr(model.config, "model_type", None))
    return spec.stacks[0].blocks


def prune_to_stage(model: nn.Module, blocks: range, first: bool, last: bool) -> None:
    """Replace, in place, every module the stage does not own by a ``NotInStage`` placeholder."""
    runner = get_runner(model.config.model_type)
    path = blocks_path(model)
    block_list = get_path(model, path)
    for index in range(len(block_list)):
        if index not in blocks:
            block_list[index] = NotInStage(f"block {index}")
    keep = {path.split(".")[0]}
    keep.update(runner.first_modules if first else ())
    keep.update(runner.last_modules if last else ())
    for name, child in list(model.named_children()):
        if name not in keep and child is not None:
            setattr(model, name, NotInStage(f"module {name!r}"))


def recompute_buffers(model: nn.Module) -> None:
    """Give the non-persistent buffers their real values after ``to_empty``, with transformers' own recipe."""
    for module in model.modules():
        if getattr(module, "_non_persistent_buffers_set", None):
            model._init_weights(module)


def _checkpoint_key(name: str, keys: dict[str, Path], prefix: str) -> str | None:
    stems = [name]
    for new, old in ((".weight", ".gamma"), (".bias", ".beta")):  # old BERT LayerNorm names
        if name.endswith(new):
            stems.append(name[: -len(new)] + old)
    for stem in stems:
        for candidate in ((f"{prefix}.{stem}", stem) if prefix else (stem,)):
            if candidate in keys:
                return candidate
    return None


def match_checkpoint_keys(model: nn.Module, index: dict[str, Path]) -> dict[str, str]:
    """Checkpoint key of every persistent tensor of ``model`` (state-dict name -> key).

    Raises ConfigError naming the missing weights when the checkpoint lacks any of them.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and not any(key.startswith(prefix + ".") for key in index):
        prefix = ""
    found, missing = {}, []
    for name in model.state_dict(keep_vars=True):
        key = _checkpoint_key(name, index, prefix)
        if key is None:
            missing.append(name)
        else:
            found[name] = key
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} weights the pipeline stages need "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                          "check that the folder holds the full model")
    return found


def load_owned_weights(model: nn.Module, index: dict[str, Path], device: torch.device) -> list[str]:
    """Copy every persistent tensor of ``model`` from the checkpoint, one tensor at a time.

    Returns the checkpoint keys read (each owned tensor once; nothing else is read). ``safe_open``
    maps the whole file and the pages a copy touches count in this process's RSS until the file is
    closed, so the file is reopened after every ``_REOPEN_BYTES`` read: the load's peak is the owned
    weights plus at most that much, not twice the owned weights.
    """
    from safetensors import safe_open

    targets = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for name, key in match_checkpoint_keys(model, index).items():
        by_file[index[key]].append((name, key))
    where = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}" \
        if device.type == "cuda" else str(device)
    read: list[str] = []
    with torch.no_grad():
        for file, pairs in sorted(by_file.items()):
            start = 0
            while start < len(pairs):
                with safe_open(str(file), framework="pt", device=where) as handle:
                    done = 0
                    while start < len(pairs) and done < _REOPEN_BYTES:
                        name, key = pairs[start]
                        target = targets[name]
                        target.copy_(handle.get_tensor(key))
                        read.append(key)
                        done += target.numel() * target.element_size()
                        start += 1
    return read


def load_stage_model(folder: Path, blocks: range, first: bool, last: bool, device: str | torch.device = "cpu",
                     dtype: str = "auto", attn_implementation: str | None = None) -> tuple[nn.Module, StageLoadReport]:
    """Build the stage's slice of the base model with only its own weights loaded (see module docstring).

    Returns the model (``eval()`` mode, on ``device``) with ``NotInStage`` placeholders for the rest,
    and a report of what was read.
    """
    device = torch.device(device)
    config = load_config(folder)
    torch_dtype = model_dtype(config, dtype, device)
    model = meta_model(config, attn_implementation, torch_dtype)
    prune_to_stage(model, blocks, first, last)
    model.to_empty(device=device)
    recompute_buffers(model)
    index = checkpoint_index(folder)
    loaded = load_owned_weights(model, index, device)
    report = StageLoadReport(
        blocks=blocks, first=first, last=last, device=str(device), dtype=str(torch_dtype).removeprefix("torch."),
        loaded_keys=loaded, files=sorted({index[k].name for k in loaded}),
        n_params=sum(p.numel() for p in model.parameters()),
    )
    return model.eval(), report
