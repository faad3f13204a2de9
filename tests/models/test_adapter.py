"""ModelAdapter: canonical names against transformers' own outputs, layer specs, errors, fallback.

Hooks are registered here with plain torch (``ref.hook`` / ``ref.select``), independently of the
capture module, so these tests pin the LayerRef contract itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import AutoTokenizer, T5EncoderModel

from neuronmap.errors import UnknownLayerError
from neuronmap.models.adapter import LayerRef, ModelAdapter
from neuronmap.models.tiny import TINY_FAMILIES

PROMPTS = ["The capital of France is Paris, and the capital of Spain is Madrid.", "Hello world"]
PRE_NORM = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "opt", "t5", "gpt_neo", "phi"}


def capture(adapter: ModelAdapter, refs: list[LayerRef], batch) -> dict[str, torch.Tensor]:
    """Run adapter.forward with one plain torch hook per ref; {name: tensor}."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for ref in refs:
        if ref.prepare is not None:
            handles.append(ref.prepare())
        if ref.hook == "input":
            def pre_hook(_m, args, kwargs, ref=ref):
                out[ref.name] = ref.select(args, kwargs).detach().clone()
            handles.append(ref.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(_m, _args, output, ref=ref):
                out[ref.name] = ref.select(output).detach().clone()
            handles.append(ref.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            adapter.forward(batch["input_ids"], batch["attention_mask"], refs)
    finally:
        for handle in handles:
            handle.remove()
    return out


def tokens(tokenizer):
    return tokenizer(PROMPTS, padding=True, return_tensors="pt")


def reference(model, batch, adapter, **kwargs):
    with torch.no_grad():
        if adapter.is_encoder_decoder:
            return model(**batch, decoder_input_ids=adapter.shift_right(batch["input_ids"]),
                         decoder_attention_mask=batch["attention_mask"], use_cache=False, **kwargs)
        return model(**batch, **kwargs)


def check_hidden(adapter, got, hidden_states, prefix=""):
    """embed = hs[0]; blocks.i = hs[i+1]; final = hs[-1]; the last block is pre-final-norm when there is one."""
    n = adapter.stack_blocks[prefix]
    assert len(hidden_states) == n + 1
    assert_close(got[f"{prefix}embed"], hidden_states[0])
    for i in range(n - 1):
        assert_close(got[f"{prefix}blocks.{i}"], hidden_states[i + 1])
    assert_close(got[f"{prefix}final"], hidden_states[-1])
    final_ref = adapter.resolve(f"{prefix}final")[0]
    last_ref = adapter.resolve(f"{prefix}blocks.{n - 1}")[0]
    if final_ref.module is last_ref.module:
        assert_close(got[f"{prefix}blocks.{n - 1}"], hidden_states[-1])
    else:  # final norm applied to the last block's residual stream gives `final`
        with torch.no_grad():
            assert_close(final_ref.module(got[f"{prefix}blocks.{n - 1}"]), got[f"{prefix}final"])


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("head", [False, True])
def test_hidden_names_equal_output_hidden_states(family, head, tiny_model):
    loaded = tiny_model(family, head=head)
    adapter, batch = loaded.adapter, tokens(loaded.tokenizer)
    got = capture(adapter, adapter.resolve("all"), batch)
    out = reference(loaded.model, batch, adapter, output_hidden_states=True)
    if adapter.is_encoder_decoder:
        check_hidden(adapter, got, out.encoder_hidden_states, "encoder.")
        check_hidden(adapter, got, out.decoder_hidden_states, "decoder.")
    else:
        check_hidden(adapter, got, out.hidden_states)
    for name, tensor in got.items():
        assert tensor.shape[:2] == batch["input_ids"].shape, name


def test_t5_encoder_model(tiny_model_dir):
    model = T5EncoderModel.from_pretrained(tiny_model_dir("t5")).eval()
    adapter = ModelAdapter(model)
    assert adapter.stacks == ["encoder."] and not adapter.is_encoder_decoder
    assert not any(name.startswith("decoder.") for name in adapter.layer_names())
    batch = tokens(AutoTokenizer.from_pretrained(tiny_model_dir("t5")))
    got = capture(adapter, adapter.resolve("all"), batch)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    check_hidden(adapter, got, out.hidden_states, "encoder.")


def _sublayer_check(family, adapter, got, block_input, prefix, i):
    """attn/mlp are the sublayer outputs before the residual add (and before any post-norm)."""
    p = f"{prefix}blocks.{i}"
    attn, mlp, out = got[f"{p}.attn"], got[f"{p}.mlp"], got[p]
    assert attn.shape == mlp.shape == out.shape
    if family in PRE_NORM:
        cross = got.get(f"{p}.cross_attn", 0)
        assert_close(block_input + attn + cross + mlp, out)
    else:  # post-norm: out = LN2(mlp + LN1(attn + x))
        block = adapter.resolve(p)[0].module
        ln1, ln2 = ((block.attention.output.LayerNorm, block.output.LayerNorm) if family != "distilbert"
                    else (block.sa_layer_norm, block.output_layer_norm))
        with torch.no_grad():
            assert_close(ln2(mlp + ln1(attn + block_input)), out)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_attn_and_mlp_are_sublayer_outputs(family, tiny_model):
    loaded = tiny_model(family)
    adapter, batch = loaded.adapter, tokens(loaded.tokenizer)
    got = capture(adapter, adapter.resolve("all"), batch)
    for prefix, n in adapter.stack_blocks.items():
        for i in range(n):
            block_input = got[f"{prefix}embed"] if i == 0 else got[f"{prefix}blocks.{i - 1}"]
            _sublayer_check(family, adapter, got, block_input, prefix, i)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5", "opt", "distilbert", "gpt_neox"])
def test_patterns_equal_output_attentions(family, tiny_model):
    loaded = tiny_model(family)
    adapter, batch = loaded.adapter, tokens(loaded.tokenizer)
    assert loaded.model.config._attn_implementation == "sdpa"
    refs = adapter.resolve("**.pattern")
    assert refs and all(ref.kind == "pattern" for ref in refs)
    got = capture(adapter, refs, batch)
    assert loaded.model.config._attn_implementation == "sdpa"  # restored
    with adapter.attention_patterns(refs):
        assert loaded.model.config._attn_implementation == "eager"
        out = reference(loaded.model, batch, adapter, output_attentions=True)
    if adapter.is_encoder_decoder:
        expected = {"encoder.": out.encoder_attentions, "decoder.": out.decoder_attentions}
        for i, cross in enumerate(out.cross_attentions):
            assert_close(got[f"decoder.blocks.{i}.cross_attn.pattern"], cross)
    else:
        expected = {"": out.attentions}
    for prefix, attentions in expected.items():
        assert len(attentions) == adapter.stack_blocks[prefix]
        for i, weights in enumerate(attentions):
            pattern = got[f"{prefix}blocks.{i}.attn.pattern"]
            assert pattern.shape == (2, 4, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
            assert_close(pattern, weights)
            assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_lists_attn_mlp_and_patterns(family, tiny_model):
    adapter = tiny_model(family).adapter
    for prefix, n in adapter.stack_blocks.items():
        for suffix in ("attn", "mlp", "attn.pattern"):
            refs = adapter.resolve(f"{prefix}blocks.*.{suffix}")
            assert [ref.name for ref in refs] == [f"{prefix}blocks.{i}.{suffix}" for i in range(n)]
        assert [r.name for r in adapter.resolve(f"{prefix}blocks.*")] == [f"{prefix}blocks.{i}" for i in range(n)]
    names = adapter.layer_names()
    assert len(names) == len(set(names))
    shapes = {s.name: s for s in adapter.describe()}
    assert set(shapes) == set(names)
    assert shapes[f"{adapter.stacks[0]}blocks.0"].shape == (64,)
    assert shapes[f"{adapter.stacks[0]}blocks.0.attn.pattern"].shape == (4, "seq", "seq")
    assert adapter.model.config._attn_implementation == "sdpa"



@pytest.mark.parametrize("spec", ["blocks.0,,blocks.1", "blocks.0,", ",blocks.0", ["blocks.0", ""]])
def test_an_empty_name_beside_others_is_an_error_not_dropped(tiny_model, spec):
    from neuronmap.errors import ConfigError

    with pytest.raises(ConfigError, match="empty name .* remove the extra comma"):
        tiny_model("gpt2").adapter.resolve(spec)

def test_spec_syntax(tiny_model):
    adapter = tiny_model("gpt2").adapter
    names = lambda spec: [ref.name for ref in adapter.resolve(spec)]  # noqa: E731
    assert names("blocks.1-2") == ["blocks.1", "blocks.2"]
    assert names("blocks.0-1.attn") == ["blocks.0.attn", "blocks.1.attn"]
    assert names("final, embed") == ["embed", "final"]  # execution order, duplicates merged
    assert names(["embed", "blocks.0,embed"]) == ["embed", "blocks.0"]
    assert names("blocks.?.mlp") == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    assert names("blocks.[02]") == ["blocks.0", "blocks.2"]
    everything = names("all")
    assert "embed" in everything and "final" in everything and "blocks.2.mlp" in everything
    assert not any(name.endswith(".pattern") for name in everything)
    assert set(names("**")) == set(adapter.layer_names())
    ref = adapter.resolve("module:h.1.mlp.c_fc")[0]
    assert ref.name == "module:h.1.mlp.c_fc" and ref.module is adapter.model.h[1].mlp.c_fc
    got = capture(adapter, [ref], tokens(tiny_model("gpt2").tokenizer))
    assert got[ref.name].shape[-1] == 4 * 64


def test_forward_runs_base_or_full_model(tiny_model):
    loaded = tiny_model("gpt2", head=True)
    adapter, batch = loaded.adapter, tokens(loaded.tokenizer)
    got = capture(adapter, adapter.resolve("module:lm_head, blocks.0"), batch)
    assert got["module:lm_head"].shape[-1] == loaded.model.config.vocab_size


def test_t5_runs_only_the_encoder_for_encoder_layers(tiny_model):
    loaded = tiny_model("t5")
    adapter, batch = loaded.adapter, tokens(loaded.tokenizer)
    assert_close(adapter.shift_right(batch["input_ids"]), loaded.model._shift_right(batch["input_ids"]))
    decoder_calls = []
    handle = loaded.model.decoder.register_forward_hook(lambda *a: decoder_calls.append(1))
    try:
        capture(adapter, adapter.resolve("encoder.blocks.*"), batch)
        assert decoder_calls == []
        capture(adapter, adapter.resolve("decoder.blocks.0.cross_attn"), batch)
        assert decoder_calls == [1]
    finally:
        handle.remove()


def test_unknown_layer_error_lists_valid_names(tiny_model):
    adapter = tiny_model("gpt2").adapter
    with pytest.raises(UnknownLayerError) as info:
        adapter.resolve("blocks.99")
    message = str(info.value)
    assert message.startswith("unknown layer 'blocks.99': the model has blocks.0-2; valid names: embed, ")
    assert "blocks.{0-2}.attn, blocks.{0-2}.attn.pattern, blocks.{0-2}.mlp, blocks.{0-2}, final" in message
    assert "See `neuronmap models layers" in message and "\n" not in message
    with pytest.raises(UnknownLayerError, match="unknown layer 'blocks.1-5'"):
        adapter.resolve("blocks.1-5")
    with pytest.raises(UnknownLayerError, match="bad layer range 'blocks.3-1'"):
        adapter.resolve("blocks.3-1")
    with pytest.raises(UnknownLayerError, match="unknown module path 'h.9.mlp'"):
        adapter.resolve("module:h.9.mlp")
    with pytest.raises(UnknownLayerError, match="empty layer spec"):
        adapter.resolve(" , ")


def test_t5_error_mentions_stack_prefixes(tiny_model):
    with pytest.raises(UnknownLayerError, match=r"names of this model start with encoder\. or decoder\."):
        tiny_model("t5").adapter.resolve("blocks.0")


def test_layer_ref_is_frozen(tiny_model):
    ref = tiny_model("gpt2").adapter.resolve("embed")[0]
    assert ref.hook == "input" and ref.module_path == "h.0"
    with pytest.raises(AttributeError):
        ref.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("family", ["gpt_neo", "phi"])
def test_gpt_neo_and_phi_from_config(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt_neo":
        config = tf.GPTNeoConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                                 attention_types=[[["global", "local"], 1]], max_position_embeddings=64)
        model = tf.GPTNeoForCausalLM(config).eval()
    else:
        config = tf.PhiConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64)
        model = tf.PhiForCausalLM(config).eval()
    adapter = ModelAdapter(model)
    batch = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    got = capture(adapter, adapter.resolve("all, **.pattern"), batch)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    check_hidden(adapter, got, out.hidden_states)
    for i in range(2):
        _sublayer_check(family, adapter, got, got["embed"] if i == 0 else got[f"blocks.{i - 1}"], "", i)
        assert_close(got[f"blocks.{i}.attn.pattern"].sum(-1), torch.ones(2, 4, 7))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.stages = nn.ModuleList([nn.Linear(8, 8)])  # shorter list: not the blocks
        self.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.norm = nn.LayerNorm(8)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for block in self.layers:
            x = block(x)
        return self.norm(x)


def test_unknown_architecture_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = _Custom().eval()
    with pytest.warns(UserWarning, match="unknown architecture '_Custom'.*'layers'"):
        adapter = ModelAdapter(model)
    assert adapter.layer_names() == ["embed", "blocks.0", "blocks.1", "blocks.2", "final"]
    ids = torch.tensor([[1, 2, 3]])
    got = capture(adapter, adapter.resolve("all"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with torch.no_grad():
        x = model.emb(ids)
        assert_close(got["embed"], x)
        for i, block in enumerate(model.layers):
            x = block(x)
            assert_close(got[f"blocks.{i}"], x)
        assert_close(got["final"], model.norm(x))
