"""Fixtures of the concept tests: the tiny GPT-2 and a sharpened copy whose gradients vary between inputs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sharp_gpt2_dir(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 with attention logits x10 and MLP weights x15.

    The random tiny model is almost linear: the gradient of a logit points the same way for every input,
    so *any* direction scores a TCAV of about 0 or 1 and no score can stand out from random CAVs. Sharper
    attention and larger MLPs make the gradient at the embeddings depend on the input (as in trained
    models); the TCAV known-answer test measures that with plain autograd before relying on it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir("gpt2")
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10.0)
            block.mlp.c_fc.weight.mul_(15.0)
            block.mlp.c_proj.weight.mul_(15.0)
    out = tmp_path_factory.mktemp("sharp") / "gpt2"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out
