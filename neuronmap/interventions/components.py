"""Components a method can read or overwrite: whole layers, single neurons and single attention heads.

Spec grammar (comma-separated, extends the canonical layer names of the adapter):

- a hidden layer or glob/range: ``blocks.3.mlp``, ``blocks.*.attn``, ``blocks.0-2`` (the whole output);
- neurons of a hidden layer: ``blocks.3.mlp[12]``, ``blocks.3.mlp[0,5,9]``, ``blocks.3[0-15]`` (features of
  its output, the same indices a stored run's columns have);
- attention heads: ``blocks.3.attn.heads.5``, ``blocks.3.attn.heads`` (all), ``blocks.*.attn.heads.*``,
  ``blocks.0-2.attn.heads.0-3``.

Why heads live on the output projection's *input*: attention concatenates the heads' weighted values
(batch, seq, n_heads * head_dim) and the output projection mixes them, so head h is exactly the slice
``[h * head_dim, (h + 1) * head_dim)`` of that input. Each family names the projection differently
(`OUT_PROJ`); the head count comes from the config and the head width from the projection's input size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError, UnknownLayerError
from ..models.adapter import LayerRef
from ..models.architectures import get_path
from ._common import select_input

# The attention output projection of each family, relative to a block.
OUT_PROJ = {
    "gpt2": "attn.c_proj",
    "gpt_neo": "attn.attention.out_proj",
    "gpt_neox": "attention.dense",
    "llama": "self_attn.o_proj",
    "mistral": "self_attn.o_proj",
    "qwen2": "self_attn.o_proj",
    "phi": "self_attn.dense",
    "opt": "self_attn.out_proj",
    "bert": "attention.output.dense",
    "roberta": "attention.output.dense",
    "distilbert": "attention.out_lin",
    "t5": "layer.0.SelfAttention.o",
}
HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")

_HEADS = re.compile(r"^(?P<layer>.+\.attn)\.heads(?:\.(?P<heads>[^.]+))?$")
_NEURONS = re.compile(r"^(?P<layer>[^\[\]]+)\[(?P<index>[^\[\]]*)\]$")
_BLOCK = re.compile(r"^(?P<prefix>(?:encoder\.|decoder\.)?)blocks\.(?P<block>\d+)\.attn$")


@dataclass(frozen=True)
class Component:
    """One addressable part of the model.

    name : str
        Canonical spelling (``blocks.1.attn.heads.0``, ``blocks.0.mlp``, ``blocks.0.mlp[5]``).
    kind : "layer" | "neurons" | "head"
    site : LayerRef
        The hooked tensor: the layer itself, or (heads) the output projection's input.
    index : tuple of int
        Features of the site (neurons), or ``(head, head_dim)`` (heads); empty for a whole layer.
    """

    name: str
    kind: str
    site: LayerRef
    index: tuple[int, ...] = ()

    @property
    def head(self) -> int:
        return self.index[0]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The component's part of the site tensor (batch, seq, F) -> (batch, seq, k)."""
        if self.kind == "layer":
            return tensor.reshape(*tensor.shape[:2], -1)
        if self.kind == "neurons":
            return tensor.reshape(*tensor.shape[:2], -1)[..., list(self.index)]
        head, width = self.index
        return tensor[..., head * width:(head + 1) * width]

    def put(self, tensor: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A copy of the site tensor with the component's part set to `values` (broadcast to (batch, seq, k))."""
        out = tensor.clone()
        flat = out.reshape(*out.shape[:2], -1)
        values = values.to(out.device, out.dtype)
        if self.kind == "layer":
            flat[...] = values
        elif self.kind == "neurons":
            flat[..., list(self.index)] = values
        else:
            head, width = self.index
            flat[..., head * width:(head + 1) * width] = values
        return out


def head_count(config: Any) -> int:
    for key in HEAD_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"cannot find the number of attention heads in the config of {type(config).__name__} "
                      f"(looked for {', '.join(HEAD_COUNT_KEYS)})")


def in_features(module: nn.Module) -> int:
    """Input width of a Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and hasattr(module, "nf"):  # transformers' Conv1D: (in, out)
        return int(weight.shape[0])
    raise ConfigError(f"attention output projection {type(module).__name__} is neither Linear nor Conv1D")


@dataclass(frozen=True)
class HeadSite:
    """Where the heads of one attention layer live: the output projection's input, split in `n_heads`."""

    layer: str  # canonical attention layer, e.g. blocks.3.attn
    ref: LayerRef  # input hook on the output projection
    n_heads: int
    head_dim: int

    @property
    def projection(self) -> nn.Module:
        return self.ref.module


def head_site(adapter: Any, attn_layer: str) -> HeadSite:
    """The head site of canonical attention layer `attn_layer` (``[prefix]blocks.N.attn``)."""
    match = _BLOCK.match(attn_layer)
    if match is None:
        raise UnknownLayerError(f"{attn_layer!r} is not an attention layer blocks.N.attn: heads are addressed as "
                                "blocks.N.attn.heads.H")
    rel = OUT_PROJ.get(adapter.family)
    if rel is None:
        raise ConfigError(f"per-head access is not mapped for family {adapter.family!r}; mapped families: "
                          f"{', '.join(sorted(OUT_PROJ))}")
    block_ref = adapter.resolve(f"{match.group('prefix')}blocks.{match.group('block')}")[0]
    module = get_path(block_ref.module, rel)
    if module is None:
        raise ConfigError(f"{adapter.family} block {block_ref.module_path} has no {rel}: per-head access needs the "
                          "attention output projection")
    n_heads = head_count(adapter.config)
    width = in_features(module)
    if width % n_heads:
        raise ConfigError(f"{block_ref.module_path}.{rel} takes {width} inputs, not a multiple of {n_heads} heads")
    ref = LayerRef(f"{attn_layer}.heads", module, f"{block_ref.module_path}.{rel}", "input", select_input)
    return HeadSite(attn_layer, ref, n_heads, width // n_heads)


def split_components(spec: str | Sequence[str]) -> list[str]:
    """Split at commas outside brackets: ``"a[1,2], b"`` -> ``["a[1,2]", "b"]``."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        depth, current = 0, ""
        for char in str(part):
            depth += char == "["
            depth -= char == "]"
            if char == "," and depth == 0:
                out.append(current)
                current = ""
            else:
                current += char
        out.append(current)
    return [item.strip() for item in out if item.strip()]


def _indices(text: str, size: int | None, what: str) -> list[int]:
    """``"3"``, ``"0,5"``, ``"0-3"``, ``"*"`` -> sorted unique ints (checked against `size` when known)."""
    values: list[int] = []
    for piece in (p.strip() for p in text.split(",")):
        if piece == "*" and size is not None:
            values.extend(range(size))
        elif re.fullmatch(r"\d+", piece):
            values.append(int(piece))
        elif re.fullmatch(r"\d+-\d+", piece):
            lo, hi = (int(v) for v in piece.split("-"))
            if lo > hi:
                raise ConfigError(f"{what} range {piece!r} is reversed: write low-high, e.g. 0-3")
            values.extend(range(lo, hi + 1))
        else:
            raise ConfigError(f"{what} {piece!r} must be an index, a range low-high or *")
    bad = [v for v in values if size is not None and v >= size]
    if bad:
        raise ConfigError(f"{what} {bad[0]} is out of range: there are {size} (0-{size - 1})")
    return sorted(set(values))


def resolve_components(loaded: Any, spec: str | Sequence[str], widths: dict[str, int] | None = None) -> list[Component]:
    """Components of a spec (see the module docstring), in the order given, duplicates dropped.

    `widths` (layer name -> feature count) lets neuron indices be checked before any forward; without it a
    too-large index fails when the hook runs.
    """
    adapter = loaded.adapter
    out: list[Component] = []
    for item in split_components(spec):
        heads = _HEADS.match(item)
        neurons = _NEURONS.match(item)
        if heads:
            for ref in adapter.resolve(heads.group("layer")):
                site = head_site(adapter, ref.name)
                for head in _indices(heads.group("heads") or "*", site.n_heads, f"head of {ref.name}"):
                    out.append(Component(f"{ref.name}.heads.{head}", "head", site.ref, (head, site.head_dim)))
        elif neurons:
            for ref in adapter.resolve(neurons.group("layer")):
                _check_hidden(ref, item)
                width = (widths or {}).get(ref.name)
                index = _indices(neurons.group("index"), width, f"neuron of {ref.name}")
                if not index:
                    raise ConfigError(f"{item!r} names no neuron: write {ref.name}[i], [i,j] or [i-j]")
                label = ",".join(str(i) for i in index)
                out.append(Component(f"{ref.name}[{label}]", "neurons", ref, tuple(index)))
        else:
            for ref in adapter.resolve(item):
                _check_hidden(ref, item)
                out.append(Component(ref.name, "layer", ref))
    seen: set[str] = set()
    unique = []
    for component in out:
        if component.name not in seen:
            seen.add(component.name)
            unique.append(component)
    return unique


def _check_hidden(ref: LayerRef, item: str) -> None:
    if ref.kind != "hidden":
        raise ConfigError(f"{item!r} is an attention pattern; ablate heads as blocks.N.attn.heads.H")
