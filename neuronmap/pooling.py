"""Pooling of (batch, seq, *feature) activations over the real (unpadded) tokens, on the device.

Pooling runs inside the capture hook, before anything is copied to the host, so a mean-pooled run
moves `d` floats per sample instead of `seq * d`. Every mode ignores padding through the attention
mask; batches are right-padded (the loader sets `padding_side="right"`).

Modes
-----
mean   average over real tokens
last   the last real token (what a causal LM "read" last)
first  the first token (BERT's [CLS])
max    element-wise maximum over real tokens
none   no pooling: one row per real token, stored with its `token_index`
"""

from __future__ import annotations

import torch

from .errors import ConfigError

POOLING_MODES = ("mean", "last", "first", "max", "none")


def check_pooling(mode: str) -> str:
    """Return `mode` if valid, else raise a ConfigError naming the allowed modes."""
    if mode not in POOLING_MODES:
        raise ConfigError(f"pooling={mode!r} is not supported; use one of {', '.join(POOLING_MODES)}")
    return mode


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool `hidden` of shape (batch, seq, *feature) over the tokens where `mask` is 1.

    Parameters
    ----------
    hidden : Tensor of shape (batch, seq, *feature)
    mask : Tensor of shape (batch, seq), 1 for real tokens, 0 for padding (right padding)
    mode : one of POOLING_MODES

    Returns
    -------
    Tensor of shape (batch, *feature) for pooled modes; for `none`, shape (n_real_tokens, *feature)
    with the real tokens of sample 0 first, then sample 1, ... in position order.
    """
    real = mask.to(torch.bool)
    if mode == "none":
        return hidden[real]
    if mode == "first":
        return hidden[:, 0]
    if mode == "last":
        last = real.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "mean":
        return mean_pool(hidden, mean_weights(mask, hidden.dtype))
    expand = real.reshape(real.shape + (1,) * (hidden.dim() - 2))
    if mode == "max":
        return hidden.masked_fill(~expand, float("-inf")).amax(dim=1)
    raise ConfigError(f"pooling={mode!r} is not supported; use one of {', '.join(POOLING_MODES)}")


def mean_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, seq) weights 1/n_real on real tokens, 0 on padding: `mean_pool`'s second argument.

    Computed once per batch and shared by every layer (`BatchPooler` caches it).
    """
    weights = mask.to(dtype)
    return (weights / weights.sum(dim=1, keepdim=True).clamp(min=1)).unsqueeze(1)


def mean_pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (batch, seq, *feature) over real tokens, as one batched matrix product.

    Why not `(hidden * mask).sum(1) / n`: that is seven kernels per layer and a temporary the size of
    `hidden`; `bmm` is one kernel that reads `hidden` once (`benchmarks/pooling.py`: 1.4-3.7x faster on
    2 CPUs, max |difference| 3.6e-7). On a GPU a 1B model's small batches are bound by kernel launches.
    """
    flat = hidden.reshape(hidden.shape[0], hidden.shape[1], -1)
    return torch.bmm(weights.to(flat.dtype), flat).reshape(hidden.shape[0], *hidden.shape[2:])
