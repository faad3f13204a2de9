"""The head viewer's data: stored patterns equal a plain h5py read, live ones equal transformers' attentions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dashtest_util import HEADS_ID, RUN_ID

pytest.importorskip("dash", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")

from dashboards import attention  # noqa: E402
from dashboards.components import Context  # noqa: E402
from dashboards.data import Repository  # noqa: E402
from dashboards.pages import attention as page  # noqa: E402
from neuronmap.errors import ConfigError  # noqa: E402
from neuronmap.store import Manifest, RunWriter  # noqa: E402


def h5py_pattern(run_dir, layer, sample_id):
    """(q, heads, k) rows of one prompt read with plain h5py from every shard file of the layer."""
    import json

    import h5py

    manifest = json.loads((run_dir / "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        if shard["layer"] != layer:
            continue
        with h5py.File(run_dir / shard["path"], "r") as f:
            keep = f["sample_id"][:] == sample_id
            if keep.any():
                parts.append((f["token_index"][:][keep], f["activations"][:][keep]))
    (tokens, rows), = parts
    return rows[np.argsort(tokens)]


def tokens_of(model_dir, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]


@pytest.mark.parametrize("layer,head", [("blocks.1.attn.pattern", 1), ("blocks.0.attn.pattern", 0)])
def test_stored_heatmap_equals_the_stored_slice_for_that_prompt_and_head(runs_dir, tiny_model_dir, layer, head):
    repo = Repository(runs_dir[0])
    prompts = repo.prompts(HEADS_ID)
    sample_id, text = int(prompts["sample_id"].iloc[3]), str(prompts["text"].iloc[3])
    fig, caption, n_heads, drawn = page.figure(repo, HEADS_ID, layer, sample_id, head)
    rows = h5py_pattern(runs_dir[0] / HEADS_ID, layer, sample_id)  # (q, heads, max_len)
    q = len(rows)
    expected = rows[:, head, :q]
    assert drawn == head and n_heads == rows.shape[1] and "stored in the run" in caption
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), expected)
    assert not rows[:, head, q:].any()  # only the zero padding of the key axis is cut
    tokens = tokens_of(tiny_model_dir("gpt2"), text)
    assert list(fig.data[0].y) == [f"{i}:{t}" for i, t in enumerate(tokens)]
    assert list(fig.data[0].x) == list(fig.data[0].y)


def test_live_heatmap_equals_transformers_attentions(runs_dir, tiny_model_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    repo = Repository(runs_dir[0])  # the mean-pooled run stores no patterns: computed from its model
    assert attention.stored_layers(repo.run(RUN_ID)) == []
    prompts = repo.prompts(RUN_ID)
    sample_id, text = int(prompts["sample_id"].iloc[5]), str(prompts["text"].iloc[5])
    fig, caption, n_heads, _ = page.figure(repo, RUN_ID, "blocks.1.attn.pattern", sample_id, 2)
    assert "computed live" in caption
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("gpt2")))
    model = AutoModel.from_pretrained(str(tiny_model_dir("gpt2")), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**tokenizer(text, return_tensors="pt"), output_attentions=True)
    reference = out.attentions[1][0].numpy()
    assert n_heads == reference.shape[0]
    np.testing.assert_allclose(np.asarray(fig.data[0].z), reference[2], rtol=1e-5, atol=1e-6)
    ids = tokenizer(text)["input_ids"]
    assert list(fig.data[0].x) == [f"{i}:{tokenizer.decode([t])}" for i, t in enumerate(ids)]


def test_a_model_that_cannot_be_loaded_offline_gives_a_clear_message(tmp_path):
    manifest = Manifest.new(model="no-such-model-anywhere", config_hash="x", tokenizer="no-such-model-anywhere",
                            layers={"blocks.0": dict(shape=[4], dtype="float32", kind="hidden", per_token=False)},
                            pooling="mean", dtype="float32", prompt_source="x", prompt_source_hash="x", n_samples=2)
    writer = RunWriter(tmp_path / "lost", manifest)
    writer.write_prompts(pd.DataFrame({"text": ["a b", "c d"]}))
    writer.write_shard("blocks.0", 0, rows=(0, 2), samples=(0, 2), activations=np.zeros((2, 4), np.float32),
                       sample_ids=np.arange(2, dtype=np.int64))
    writer.complete()
    repo = Repository(tmp_path)
    with pytest.raises(ConfigError, match="cannot load model 'no-such-model-anywhere'") as caught:
        attention.live_model(repo.run("lost"))
    assert "\n" not in str(caught.value) and "offline" in str(caught.value)
    shown = str(page.layout(Context(repo, None), {"run": "lost"}))
    assert "Attention cannot be computed for this run" in shown and "no-such-model-anywhere" in shown
