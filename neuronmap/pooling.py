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
    expand = real.reshape(real.shape + (1,) * (hidden.dim() - 2))
    if mode == "mean":
        weights = expand.to(hidden.dtype)
        total = (hidden * weights).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1)
        return total / count
    if mode == "max":
        return hidden.masked_fill(~expand, float("-inf")).amax(dim=1)
    raise ConfigError(f"pooling={mode!r} is not supported; use one of {', '.join(POOLING_MODES)}")
