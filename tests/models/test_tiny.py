"""Tiny random models: every family saves, reloads through transformers and tokenises text."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
from transformers import AutoTokenizer

from neuronmap.errors import ConfigError
from neuronmap.models.tiny import TINY_FAMILIES, make_tiny

TEXT = "The quick brown fox jumps over the lazy dog, 42 times!"
HEAD = {"bert": AutoModelForMaskedLM, "roberta": AutoModelForMaskedLM, "distilbert": AutoModelForMaskedLM,
        "t5": AutoModelForSeq2SeqLM}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_reloads_and_tokenises(family, tiny_model_dir):
    folder = tiny_model_dir(family)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == family
    n_blocks = getattr(config, "num_hidden_layers", None) or config.num_layers
    assert 2 <= n_blocks <= 4
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or config.dim
    assert hidden == 64
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    assert family == "t5" or positions >= 256  # T5 uses relative positions

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.vocab_size == len(tokenizer)
    ids = tokenizer(TEXT)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    expected = TEXT.lower() if family in ("bert", "distilbert") else TEXT  # MiniLM's WordPiece is uncased
    assert decoded == expected
    assert max(ids) < config.vocab_size

    model = HEAD.get(family, AutoModelForCausalLM).from_pretrained(folder).eval()
    base = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer([TEXT, "short"], padding=True, return_tensors="pt") if tokenizer.pad_token else \
        tokenizer([TEXT], return_tensors="pt")
    with torch.no_grad():
        if family == "t5":
            out = model(**batch, decoder_input_ids=batch["input_ids"][:, :3])
        else:
            out = model(**batch)
        base_out = base(**batch, **({"decoder_input_ids": batch["input_ids"][:, :3]} if family == "t5" else {}))
    assert out.logits.shape[-1] == config.vocab_size
    assert torch.isfinite(out.logits).all()
    assert base_out.last_hidden_state.shape[-1] == 64


def test_t5_special_tokens(tiny_model_dir):
    folder = tiny_model_dir("t5")
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token_id == config.pad_token_id == config.decoder_start_token_id == 0
    assert tokenizer(TEXT)["input_ids"][-1] == tokenizer.eos_token_id == config.eos_token_id


def test_roberta_special_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("roberta"))
    assert [tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token, tokenizer.mask_token] == \
        ["<s>", "<pad>", "</s>", "<mask>"]
    assert tokenizer.pad_token_id == 1
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_make_tiny_is_deterministic(tmp_path):
    a = _digest(make_tiny("llama", tmp_path / "a", seed=0))
    b = _digest(make_tiny("llama", tmp_path / "b", seed=0))
    c = _digest(make_tiny("llama", tmp_path / "c", seed=1))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no tiny model for family 'gpt5'"):
        make_tiny("gpt5", tmp_path)


def test_make_tiny_replaces_only_what_it_wrote(tmp_path):
    """Re-making a tiny model replaces it; any other folder or file is refused and left as it was."""
    first = make_tiny("gpt2", tmp_path / "tiny", seed=0)
    (first / "stale.bin").write_bytes(b"from an older make")
    again = make_tiny("gpt2", tmp_path / "tiny", seed=1)
    assert not (again / "stale.bin").exists() and (again / "config.json").is_file()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not empty and was not written by make-tiny"):
        make_tiny("gpt2", notes)
    assert [p.name for p in notes.iterdir()] == ["thesis.tex"]

    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        make_tiny("gpt2", file)
    assert file.read_text() == "x"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_tiny("bert", empty) / "config.json").is_file()
