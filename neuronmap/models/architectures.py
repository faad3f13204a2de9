"""Where each architecture keeps its blocks, attention, MLP and final norm.

One ``ArchSpec`` per ``config.model_type`` maps the canonical layer names (see docs/internals.md,
"Canonical semantics") onto module paths relative to the *base* model (``model.base_model``), so the
same spec serves ``GPT2Model`` and ``GPT2LMHeadModel``. Unknown architectures get a spec guessed from
the module tree (the longest ``nn.ModuleList`` of same-class blocks), with a warning.

Why these modules (all families): ``attn`` is the module whose output is the attention output
projection before the residual add and any post-norm; ``pattern`` is the module that returns the
softmax weights as the last element of its output tuple (only with eager attention); ``mlp`` is the
MLP output before the residual add. Dropout after them is the identity in ``eval()`` mode.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class StackSpec:
    """One stack of blocks: ``prefix`` of its canonical names, paths relative to the base model."""

    prefix: str
    blocks: str
    final: str | None  # final norm; None -> ``final`` is the last block's output


@dataclass(frozen=True)
class ArchSpec:
    """Paths inside one block (relative to the block); ``None`` -> the family has no such layer."""

    stacks: tuple[StackSpec, ...]
    attn: str | None
    pattern: str | None
    mlp: str | None
    cross_attn: str | None = None
    cross_pattern: str | None = None
    mlp_flat: bool = False  # the MLP works on (batch*seq, d) rows (OPT); refs reshape it back
    guessed: bool = field(default=False, compare=False)


def _llama_like(final: str = "norm") -> ArchSpec:
    return ArchSpec((StackSpec("", "layers", final),), attn="self_attn", pattern="self_attn", mlp="mlp")


def _bert_like(blocks: str = "encoder.layer") -> ArchSpec:
    # BertAttention = BertSelfAttention (weights) + BertSelfOutput(dense -> dropout -> LayerNorm(x + residual)),
    # so the projection before the residual add is attention.output.dense; likewise output.dense for the MLP.
    return ArchSpec((StackSpec("", blocks, None),), attn="attention.output.dense", pattern="attention.self",
                    mlp="output.dense")


_T5_STACKS = (StackSpec("encoder.", "encoder.block", "encoder.final_layer_norm"),
              StackSpec("decoder.", "decoder.block", "decoder.final_layer_norm"))

SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec((StackSpec("", "h", "ln_f"),), attn="attn", pattern="attn", mlp="mlp"),
    "gpt_neo": ArchSpec((StackSpec("", "h", "ln_f"),), attn="attn", pattern="attn", mlp="mlp"),
    "gpt_neox": ArchSpec((StackSpec("", "layers", "final_layer_norm"),), attn="attention", pattern="attention",
                         mlp="mlp"),
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "phi": _llama_like("final_layernorm"),
    "opt": ArchSpec((StackSpec("", "decoder.layers", "decoder.final_layer_norm"),), attn="self_attn",
                    pattern="self_attn", mlp="fc2", mlp_flat=True),
    "bert": _bert_like(),
    "roberta": _bert_like(),
    "distilbert": ArchSpec((StackSpec("", "transformer.layer", None),), attn="attention", pattern="attention",
                           mlp="ffn"),
    # T5Block.layer = [T5LayerSelfAttention, (T5LayerCrossAttention,) T5LayerFF]; "layer.-1" is the last one.
    "t5": ArchSpec(_T5_STACKS, attn="layer.0.SelfAttention", pattern="layer.0.SelfAttention",
                   mlp="layer.-1.DenseReluDense", cross_attn="layer.1.EncDecAttention",
                   cross_pattern="layer.1.EncDecAttention"),
}

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
_FINAL_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` (negative integers index from the end), or None."""
    module = root
    for part in path.split(".") if path else []:
        if part.lstrip("-").isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
            index = int(part)
            if not -len(module) <= index < len(module):
                return None
            module = module[index]
        else:
            module = getattr(module, part, None)
            if not isinstance(module, nn.Module):
                return None
    return module


def find_spec(base: nn.Module, model_type: str | None) -> ArchSpec:
    """The spec of a known ``model_type`` whose block paths exist in ``base``, else a guessed one (warns)."""
    spec = SPECS.get(model_type or "")
    if spec is not None:
        present = [s for s in spec.stacks if isinstance(get_path(base, s.blocks), nn.ModuleList)]
        if present:
            # T5EncoderModel has only the encoder stack of the T5 spec.
            return ArchSpec(tuple(present), spec.attn, spec.pattern, spec.mlp, spec.cross_attn, spec.cross_pattern,
                            spec.mlp_flat)
    return guess_spec(base, model_type)


def guess_spec(base: nn.Module, model_type: str | None) -> ArchSpec:
    """Guess blocks as the longest ModuleList of same-class modules; attn/mlp/final by common names."""
    best_path, best_len = None, 0
    for path, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            if len({type(m) for m in module}) == 1:
                best_path, best_len = path, len(module)
    what = model_type or type(base).__name__
    if best_path is None:
        raise ValueError(f"cannot find the blocks of architecture {what!r}: no nn.ModuleList of same-class modules")
    parent_path = best_path.rpartition(".")[0]
    parent = get_path(base, parent_path)
    final = next((f"{parent_path}.{n}".lstrip(".") for n in _FINAL_NAMES
                  if isinstance(getattr(parent, n, None), nn.Module)), None)
    block = get_path(base, best_path)[0]
    attn = next((n for n in _ATTN_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    mlp = next((n for n in _MLP_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    warnings.warn(
        f"unknown architecture {what!r}: guessed blocks.0-{best_len - 1} = '{best_path}', "
        f"attn = {attn!r}, mlp = {mlp!r}, final = {final!r}; check them with `neuronmap models layers`",
        stacklevel=3,
    )
    return ArchSpec((StackSpec("", best_path, final),), attn=attn, pattern=None, mlp=mlp, guessed=True)
