"""How each model family runs a contiguous range of its blocks outside the base model's ``forward``.

A pipeline stage holds only some blocks, so it cannot call ``base_model(input_ids)``. Instead the
first stage does what the base model's ``forward`` does *before* its block loop (embeddings, the
attention mask in the form the blocks expect, position ids, rotary cos/sin), every stage calls its
blocks exactly as that loop does, and the last stage applies what follows the loop (the final norm).
Copying the base model's own calls line for line is what makes the sharded output equal the
unsharded one bit for bit; each runner below names the transformers code it mirrors (transformers
5.x; a version that changes these forwards is caught by the equality tests in
tests/actors/test_pipeline.py).

What flows between stages is ``hidden`` (batch, seq, d) plus a ``context`` dict of the per-batch
tensors the blocks need; both are plain tensors (or None), so Ray can ship them as one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

Context = dict[str, Any]


@dataclass(frozen=True)
class StageRunner:
    """What one family's stages keep and how they call it.

    ``first_modules`` / ``last_modules``: base-model attributes only the first / last stage keeps
    (every other top-level module that is not on the block path, e.g. BERT's pooler, is dropped).
    ``embed(base, input_ids, attention_mask) -> (hidden, context)``: the prologue of the base forward.
    ``call_block(block, index, hidden, context, config) -> hidden``: one iteration of its block loop.
    ``finish(base, hidden) -> hidden``: the epilogue (final norm), on the last stage.
    """

    first_modules: tuple[str, ...]
    last_modules: tuple[str, ...]
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Context]]
    call_block: Callable[[nn.Module, int, torch.Tensor, Context, Any], torch.Tensor]
    finish: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _positions(inputs_embeds: torch.Tensor) -> torch.Tensor:
    """``position_ids`` as decoder base models build them without a cache: (1, seq)."""
    return torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)


# --------------------------------------------------------------------------------------- GPT-2
# Mirrors GPT2Model.forward (modeling_gpt2.py): wte + wpe, create_causal_mask, drop, then
# block(hidden, cache, causal_mask, encoder_hidden_states, encoder_attention_mask=..., use_cache=...,
# position_ids=...), then ln_f.
def _gpt2_embed(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Context]:
    from transformers.masking_utils import create_causal_mask

    inputs_embeds = base.wte(input_ids)
    position_ids = _positions(inputs_embeds)
    hidden = inputs_embeds + base.wpe(position_ids).to(inputs_embeds.device)
    attention_mask = attention_mask.view(input_ids.shape[0], -1)
    mask = create_causal_mask(config=base.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              cache=None, position_ids=position_ids)
    return base.drop(hidden), {"mask": mask, "position_ids": position_ids}


def _gpt2_block(block: nn.Module, index: int, hidden: torch.Tensor, ctx: Context, config: Any) -> torch.Tensor:
    return block(hidden, None, ctx["mask"], None, encoder_attention_mask=None, use_cache=False,
                 position_ids=ctx["position_ids"])


# ------------------------------------------------------------------------------ Llama family
# Mirrors LlamaModel / MistralModel / Qwen2Model.forward: embed_tokens, the causal mask(s),
# rotary_emb(hidden, position_ids) -> (cos, sin), then decoder_layer(hidden, attention_mask=...,
# position_embeddings=..., position_ids=..., cache=None, use_cache=False), then norm.
# Mistral uses the sliding-window mask when config.sliding_window is set; Qwen2 builds one mask per
# layer type and gives layer i the mask of config.layer_types[i].
def _llama_masks(family: str) -> Callable[..., dict[str, Any]]:
    def masks(config: Any, **kwargs: Any) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if family == "mistral":
            make = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
            return {"full_attention": make(config=config, **kwargs)}
        out = {"full_attention": create_causal_mask(config=config, **kwargs)}
        if family == "qwen2" and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            out["sliding_attention"] = create_sliding_window_causal_mask(config=config, **kwargs)
        return out

    return masks


def _llama_embed_for(family: str):
    make_masks = _llama_masks(family)

    def embed(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Context]:
        inputs_embeds = base.embed_tokens(input_ids)
        position_ids = _positions(inputs_embeds)
        masks = make_masks(base.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=None,
                           position_ids=position_ids)
        position_embeddings = base.rotary_emb(inputs_embeds, position_ids=position_ids)
        return inputs_embeds, {"masks": masks, "position_embeddings": position_embeddings,
                               "position_ids": position_ids}

    return embed


def _layer_type(config: Any, index: int) -> str:
    types = getattr(config, "layer_types", None)
    return types[index] if types else "full_attention"


def _llama_block(block: nn.Module, index: int, hidden: torch.Tensor, ctx: Context, config: Any) -> torch.Tensor:
    masks = ctx["masks"]
    mask = masks.get(_layer_type(config, index), masks["full_attention"])
    return block(hidden, attention_mask=mask, position_embeddings=ctx["position_embeddings"],
                 position_ids=ctx["position_ids"], cache=None, use_cache=False)


# ------------------------------------------------------------------------------- BERT family
# Mirrors BertModel / RobertaModel.forward: embeddings(input_ids) (positions, token types and
# RoBERTa's padding-aware position ids are made inside the embeddings module),
# _create_attention_masks (bidirectional, causal when config.is_decoder), then BertEncoder's loop
# layer(hidden, attention_mask, encoder_hidden_states, encoder_attention_mask=None, cache=None,
# position_ids=None); no final norm. DistilBertModel: embeddings(input_ids), create_bidirectional_mask,
# layer(hidden, attention_mask).
def _bert_mask(base: nn.Module, embedded: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    if getattr(base.config, "is_decoder", False):
        return create_causal_mask(config=base.config, inputs_embeds=embedded, attention_mask=attention_mask, cache=None)
    return create_bidirectional_mask(config=base.config, inputs_embeds=embedded, attention_mask=attention_mask)


def _bert_embed(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Context]:
    embedded = base.embeddings(input_ids=input_ids)
    return embedded, {"mask": _bert_mask(base, embedded, attention_mask)}


def _bert_block(block: nn.Module, index: int, hidden: torch.Tensor, ctx: Context, config: Any) -> torch.Tensor:
    return block(hidden, ctx["mask"], None, encoder_attention_mask=None, cache=None, position_ids=None)


def _distilbert_embed(base: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, Context]:
    from transformers.masking_utils import create_bidirectional_mask

    embedded = base.embeddings(input_ids, None, None)
    mask = create_bidirectional_mask(config=base.config, inputs_embeds=embedded, attention_mask=attention_mask)
    return embedded, {"mask": mask}


def _distilbert_block(block: nn.Module, index: int, hidden: torch.Tensor, ctx: Context, config: Any) -> torch.Tensor:
    return block(hidden, ctx["mask"])


def _final_norm(name: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    def finish(base: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(base, name)(hidden)

    return finish


def _no_final(base: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def _llama_like(family: str) -> StageRunner:
    return StageRunner(("embed_tokens", "rotary_emb"), ("norm",), _llama_embed_for(family), _llama_block,
                       _final_norm("norm"))


RUNNERS: dict[str, StageRunner] = {
    "gpt2": StageRunner(("wte", "wpe", "drop"), ("ln_f",), _gpt2_embed, _gpt2_block, _final_norm("ln_f")),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "bert": StageRunner(("embeddings",), (), _bert_embed, _bert_block, _no_final),
    "roberta": StageRunner(("embeddings",), (), _bert_embed, _bert_block, _no_final),
    "distilbert": StageRunner(("embeddings",), (), _distilbert_embed, _distilbert_block, _no_final),
}
SUPPORTED_FAMILIES = tuple(RUNNERS)


def get_runner(family: str) -> StageRunner:
    """The runner of ``family`` (a ``config.model_type``); ConfigError naming the supported ones."""
    from neuronmap.errors import ConfigError

    runner = RUNNERS.get(family)
    if runner is None:
        raise ConfigError(f"pipeline-parallel stages do not support model family {family!r}: supported are "
                          f"{', '.join(SUPPORTED_FAMILIES)}; run this model without --stages (in-process or "
                          "data-parallel engine)")
    return runner
