"""A hand-built two-layer, attention-only GPT-2 whose weights implement an induction circuit.

Layer 0 head 1 (``A``) is a previous-token head; layer 1 head 0 (``B``) is an induction head reading A's
output with its keys; the other two heads and both MLPs have zero weights. Everything is written by hand,
so tests know the right answer without trusting any library's notion of "induction".

Construction (logical residual space, m dims): token one-hot [0, V), position one-hot [V, V+P), "previous
token" one-hot [V+P, V+P+V) written by A, "output" one-hot [V+P+V, V+P+2V) written by B and read by the
unembedding. Each logical dim i is stored as the pair (+x, -x) in residual dims (2i, 2i+1), so every
residual vector has mean 0; with ``layer_norm_epsilon = 1e10`` and norm weights 1e5 every LayerNorm is then
exactly the identity in float32 (var + 1e10 == 1e10), which makes the model linear where we need it.
"""

from __future__ import annotations

import math

import torch

WORDS = [chr(ord("a") + i) for i in range(16)]
V = len(WORDS) + 1  # + <unk>
P = 48
M = 3 * V + P
D = 2 * M
HEADS = 2
HD = D // HEADS
A = (0, 1)  # previous-token head (layer, head)
B = (1, 0)  # induction head
SHARP = 30.0  # attention logit of a match
COPY = 10.0  # output logit written by B


def _write(i: int) -> torch.Tensor:
    """Residual vector holding logical dim i = 1."""
    v = torch.zeros(D)
    v[2 * i], v[2 * i + 1] = 1.0, -1.0
    return v


def _read(i: int) -> torch.Tensor:
    """Residual read-out of logical dim i."""
    return _write(i) * 0.5


TOK, POS, PREV, OUT = 0, V, V + P, V + P + V


def build_induction_model(out_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    config = GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=2, n_head=HEADS, n_inner=4,
                        layer_norm_epsilon=1e10, tie_word_embeddings=False, attn_pdrop=0.0, resid_pdrop=0.0,
                        embd_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    scale = SHARP * math.sqrt(HD)  # GPT-2 divides scores by sqrt(head_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tf = model.transformer
        for t in range(V):
            tf.wte.weight[t] = _write(TOK + t)
            model.lm_head.weight[t] = _read(OUT + t)
        for p in range(P):
            tf.wpe.weight[p] = _write(POS + p)
        for ln in [tf.ln_f] + [m for block in tf.h for m in (block.ln_1, block.ln_2)]:
            ln.weight.fill_(1e5)
        # A: query at position i looks for key position i - 1; value = token; writes it to PREV.
        layer, head = A
        w, o = tf.h[layer].attn.c_attn.weight, tf.h[layer].attn.c_proj.weight  # Conv1D: (in, out)
        q0, k0, v0 = head * HD, D + head * HD, 2 * D + head * HD
        for i in range(1, P):
            w[:, q0 + i - 1] += scale * _read(POS + i)
        for j in range(P):
            w[:, k0 + j] += _read(POS + j)
        for t in range(V):
            w[:, v0 + t] += _read(TOK + t)
            o[head * HD + t] += _write(PREV + t)
        # B: query = current token, key = previous token (from A), value = token; writes it to OUT.
        layer, head = B
        w, o = tf.h[layer].attn.c_attn.weight, tf.h[layer].attn.c_proj.weight
        q0, k0, v0 = head * HD, D + head * HD, 2 * D + head * HD
        for t in range(V):
            w[:, q0 + t] += scale * _read(TOK + t)
            w[:, k0 + t] += _read(PREV + t)
            w[:, v0 + t] += _read(TOK + t)
            o[head * HD + t] += COPY * _write(OUT + t)
    model.save_pretrained(out_dir)
    vocab = {word: i for i, word in enumerate(WORDS)}
    vocab["<unk>"] = len(WORDS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>").save_pretrained(out_dir)
    return out_dir


def hooks_left(model) -> int:
    """Forward, pre- and backward hooks anywhere in the model, except transformers' own.

    transformers installs permanent output-recording hooks the first time ``output_hidden_states`` is used;
    those belong to the library, not to the code under test.
    """
    count = 0
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            count += sum(1 for fn in hooks.values() if not getattr(fn, "__module__", "").startswith("transformers"))
    return count
