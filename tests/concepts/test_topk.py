"""Top-k activating prompts and tokens per neuron, against a numpy argsort over the whole layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from concepttest_util import one_line_error, run_cli, write_run

from neuronmap.analysis.runner import analyze
from neuronmap.concepts.topk import TopActivations, parse_neurons, top_activations
from neuronmap.errors import ConfigError, UnknownLayerError

TEXTS = ["the cat sat on the mat", "a dog ran to the big red house", "people live where it is warm",
         "then it ran", "the mat and the house and the cat", "red red red", "where do people go then",
         "a big cat", "the dog and the cat ran", "house"]


def _reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per column by a stable argsort of -x over the full array (ties: lower row first)."""
    order = np.argsort(-x.astype(np.float64), axis=0, kind="stable")[:k].T
    return np.take_along_axis(x.astype(np.float64).T, order, axis=1), order


def _read_h5(run: Path, layer: str) -> np.ndarray:
    """The layer's rows read with plain h5py, shard files in order (not through neuronmap's reader)."""
    import h5py

    parts = []
    for path in sorted((run / "activations" / layer).glob("part-*.h5")):
        with h5py.File(path, "r") as handle:
            parts.append(handle["activations"][...])
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((530, 12)).astype(np.float32)
    x[:, 3] = np.round(x[:, 3], 1)  # many ties in neuron 3
    y = rng.standard_normal((530, 5)).astype(np.float16)  # float16: ties everywhere
    return write_run(tmp_path_factory.mktemp("topk") / "run", {"blocks.0": x, "blocks.1": y}, samples_per_shard=64)


def test_streaming_state_equals_argsort_whatever_the_batches():
    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal((1000, 9)), 1)
    values, rows = _reference(x, 7)
    for size in (1, 13, 999, 1000):
        got_values, got_rows = top_activations((x[i:i + size] for i in range(0, 1000, size)), 7)
        np.testing.assert_array_equal(got_rows, rows)
        np.testing.assert_array_equal(got_values, values)
    # merging the states of two halves (in either order) gives the state of the whole
    first, second = TopActivations(7).add(x[:400], 0), TopActivations(7).add(x[400:], 400)
    np.testing.assert_array_equal(second.merge(first).result()[1], rows)
    # NaN ranks last; a neuron of NaN only ranks no row
    y = x[:20].copy()
    y[:, 0] = np.nan
    y[3, 1] = np.nan
    state = TopActivations(3).add(y, 0)
    values, rows = state.result()
    assert rows[0].tolist() == [-1, -1, -1] and np.isneginf(values[0]).all() and state.n_nan == 21
    assert 3 not in rows[1].tolist()
    # fewer rows than k: only the rows seen
    v, r = top_activations([x[:3]], 5, columns=[2])
    assert r.shape == (1, 3) and sorted(r[0].tolist()) == [0, 1, 2]


def test_top_activations_analysis_equals_argsort(sample_run):
    artifact = analyze(sample_run, "top-activations", params={"k": 10}, batch_size=50)
    table = artifact.table("top")
    for layer, width in (("blocks.0", 12), ("blocks.1", 5)):
        x = _read_h5(sample_run, layer)
        values, rows = _reference(x, 10)
        np.testing.assert_array_equal(artifact.array(f"rows@{layer}"), rows)
        np.testing.assert_array_equal(artifact.array(f"values@{layer}"), values)
        np.testing.assert_array_equal(artifact.array(f"neurons@{layer}"), np.arange(width))
        part = table[table["layer"] == layer]
        assert len(part) == width * 10
        first = part[part["neuron"] == 3].sort_values("rank")
        np.testing.assert_array_equal(first["row"].to_numpy(), rows[3])
        assert first["text"].tolist() == [f"prompt {r}" for r in rows[3]]
    assert artifact.metrics()["n_neurons"] == 17


def test_named_neurons(sample_run):
    artifact = analyze(sample_run, "top-activations", params={"neuron": ["blocks.0:3", "blocks.0:7", 1], "k": 4})
    table = artifact.table("top")
    assert sorted({(l, n) for l, n in zip(table["layer"], table["neuron"])}) == [
        ("blocks.0", 1), ("blocks.0", 3), ("blocks.0", 7), ("blocks.1", 1)]
    x = _read_h5(sample_run, "blocks.0")
    _, rows = _reference(x, 4)
    np.testing.assert_array_equal(artifact.array("rows@blocks.0"), rows[[3, 7, 1]])
    metrics = artifact.metrics()
    assert metrics["max:blocks.0:3"] == pytest.approx(float(x[:, 3].max()))
    assert parse_neurons("blocks.0:2", ["blocks.0", "blocks.1"]) == {"blocks.0": [2]}
    with pytest.raises(UnknownLayerError):
        parse_neurons("blocks.7:2", ["blocks.0"])
    with pytest.raises(ConfigError):
        parse_neurons("blocks.0:x", ["blocks.0"])


def test_per_token_run_gives_tokens_in_context(tmp_path, tiny_model_dir):
    """pooling none: the top rows are tokens; their text is the tokenizer's token at token_index."""
    from transformers import AutoTokenizer

    import neuronmap

    model = tiny_model_dir("gpt2")
    run = neuronmap.extract(model, pd.DataFrame({"text": TEXTS}), layers="blocks.1", out=tmp_path / "run",
                            pooling="none", device="cpu", samples_per_shard=3)
    artifact = analyze(run.path, "top-activations", params={"neuron": [0, 5], "k": 6, "context": 2}, batch_size=7)
    table = artifact.table("top")
    x = run.array("blocks.1")
    _, rows = _reference(x, 6)
    np.testing.assert_array_equal(artifact.array("rows@blocks.1"), rows[[0, 5]])
    tokenizer = AutoTokenizer.from_pretrained(model)
    for _, row in table.iterrows():
        ids = tokenizer(TEXTS[int(row["sample_id"])])["input_ids"]
        assert row["token"] == tokenizer.decode([ids[int(row["token_index"])]])
        assert f"[[{row['token']}]]" in row["context"]
        assert row["text"] == TEXTS[int(row["sample_id"])]
    from neuronmap.viz import figure_for_artifact

    figure = figure_for_artifact(artifact)
    assert figure.layout.meta["n_shown"] == 2 and len(figure.data) == 2
    assert "neurons with the largest" not in figure.layout.title.text  # all neurons drawn: nothing to say
    from neuronmap.viz.concepts import top_activations_figure

    cut = top_activations_figure(table, max_neurons=1)
    assert cut.layout.title.text == ("top activating inputs (the 1 of 2 neurons with the largest top value, "
                                     "all layers)")


def test_cli_and_errors(sample_run, capsys):
    code, out, err = run_cli(capsys, "analyze", sample_run, "top-activations", "--param", "neuron=blocks.0:3",
                             "--param", "k=5", "--json")
    assert code == 0, err
    assert json.loads(out)["units"]["run"]["metrics"]["n_neurons"] == 1
    for param, expected in (("neuron=blocks.9:3", "blocks.9"), ("neuron=blocks.0:40", "out of range"),
                            ("k=0", "k=0"), ("neuron=blocks.0:x", "LAYER:INDEX")):
        code, _, err = run_cli(capsys, "analyze", sample_run, "top-activations", "--param", param)
        assert code == 2, (param, err)
        assert expected in one_line_error(err)


def test_k_above_the_rows_is_one_line_and_k_equal_to_the_rows_ranks_all(sample_run, capsys):
    before = sorted(p.name for p in (sample_run / "analyses").iterdir()) if (sample_run / "analyses").exists() else []
    code, _, err = run_cli(capsys, "analyze", sample_run, "top-activations", "--param", "k=100000000")
    assert code == 2, err
    assert "k=100000000 is more than the 530 rows of the selected layers" in one_line_error(err)
    after = sorted(p.name for p in (sample_run / "analyses").iterdir()) if (sample_run / "analyses").exists() else []
    assert after == before
    artifact = analyze(sample_run, "top-activations", layers="blocks.1", params={"neuron": [0], "k": 530})
    x = _read_h5(sample_run, "blocks.1")
    values, rows = _reference(x[:, [0]], 530)
    np.testing.assert_array_equal(artifact.array("values@blocks.1", "run"), values)
    np.testing.assert_array_equal(artifact.array("rows@blocks.1", "run"), rows)
