"""The model registry: entries, lookup, suggestions."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from neuronmap.models.registry import ModelEntry, get_entry, list_models, suggest
from neuronmap.models.tiny import TINY_FAMILIES

REQUIRED = {
    "gpt2", "gpt2-medium", "gpt2-large", "distilgpt2", "bert-base-cased", "bert-base-uncased",
    "distilbert-base-uncased", "roberta-base", "t5-small", "t5-base", "llama-3.2-1b", "tinyllama", "pythia-70m",
    "pythia-160m", "opt-125m", "gpt-neo-125m", "qwen2.5-0.5b", "mistral-7b", "phi-2", "all-minilm-l6-v2",
}


def test_registry_has_the_required_models_once():
    names = [entry.name for entry in list_models()]
    assert len(names) >= 19
    assert len(names) == len(set(names))
    assert REQUIRED <= set(names)
    assert all(isinstance(entry, ModelEntry) for entry in list_models())


def test_registry_covers_every_tiny_family():
    assert set(TINY_FAMILIES) <= {entry.family for entry in list_models()}


@pytest.mark.parametrize("name, hub_id", [
    ("llama-3.2-1b", "meta-llama/Llama-3.2-1B"),
    ("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    ("pythia-70m", "EleutherAI/pythia-70m"),
    ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
    ("phi-2", "microsoft/phi-2"),
    ("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
])
def test_hub_ids(name, hub_id):
    assert get_entry(name).hub_id == hub_id


def test_get_entry_is_case_insensitive_and_matches_hub_ids():
    assert get_entry("GPT2").name == "gpt2"
    assert get_entry("eleutherai/PYTHIA-70m").name == "pythia-70m"
    assert get_entry("t5-small").kind == "encoder-decoder"
    assert get_entry("no-such-model") is None


def test_suggest_finds_typos_and_prefixes():
    assert "gpt2" in suggest("gtp2")
    assert set(suggest("pythia")) == {"pythia-70m", "pythia-160m"}
    assert suggest("xyzzy") == []


def test_local_packages_ship_a_model_folder():
    for entry in list_models():
        if entry.local_package:
            folder = Path(importlib.import_module(entry.local_package).get_model_path())
            assert (folder / "config.json").is_file(), entry.name
