"""`figure_for_artifact`: each analysis' figure holds exactly the numbers its artifact stored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly", reason="plotly is part of the dashboard extra (pip install -e '.[dashboard]')")

from neuronmap.analysis import analyze, pair_matrix  # noqa: E402
from neuronmap.viz import figure_for_artifact, figure_units  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _no_none(values):
    return [v for v in values if v is not None]


def test_pca_scatter_points_are_the_projection_with_prompts_on_hover(run_path):
    artifact = analyze(run_path, "pca", layers="blocks.*", labels="topic")
    assert figure_units(artifact) == ["blocks.0", "blocks.1", "blocks.2"]
    prompts = pd.read_parquet(run_path / "prompts.parquet")
    fig = figure_for_artifact(artifact, "blocks.1", prompts=prompts)
    table = artifact.table("projection")
    table = table[table["layer"] == "blocks.1"]
    for trace in fig.data:
        part = table[table["label"] == trace.name]
        assert np.allclose(np.column_stack([trace.x, trace.y]), part[["pc1", "pc2"]].to_numpy())
        assert np.array_equal(trace.customdata, part["sample_id"].to_numpy())
        assert trace.hovertext[0] == f"#{part['sample_id'].iloc[0]}: prompt number {part['sample_id'].iloc[0]}"
    colour = {i: ("even" if i % 2 == 0 else "odd") for i in range(60)}
    recoloured = figure_for_artifact(artifact, "blocks.1", color=colour, color_title="parity")
    assert [t.name for t in recoloured.data] == ["even", "odd"]


def test_tsne_scatter_points_are_the_embedding(run_path):
    artifact = analyze(run_path, "tsne", layers="blocks.0", params={"perplexity": 5, "max_iter": 250})
    fig = figure_for_artifact(artifact)
    table = artifact.table("embedding")
    assert np.allclose(np.column_stack([fig.data[0].x, fig.data[0].y]), table[["tsne1", "tsne2"]].to_numpy())
    with pytest.raises(ValueError, match=r"needs 3 dimensions; the embedding has 2 \(re-run tsne with --param "
                                         r"n_components=3\)"):
        figure_for_artifact(artifact, dims=3)  # was drawn in 2-D without a word


def test_pair_heatmaps_hold_pair_matrix(run_path):
    artifact = analyze(run_path, "cka", layers="blocks.*")
    fig = figure_for_artifact(artifact)
    expected = pair_matrix(artifact, "cka", diagonal=1.0)
    assert np.allclose(fig.data[0].z, expected.to_numpy())
    assert list(fig.data[0].y) == ["blocks.0", "blocks.1", "blocks.2"]


def test_stats_violins_hold_per_neuron_means_and_stds(run_path):
    artifact = analyze(run_path, "stats", layers="blocks.0,blocks.2")
    fig = figure_for_artifact(artifact)
    assert figure_units(artifact) == [None]
    means = [t for t in fig.data if t.xaxis == "x"]
    stds = [t for t in fig.data if t.xaxis == "x2"]
    for trace, unit in zip(means, ["blocks.0", "blocks.2"]):
        assert trace.name == unit and np.allclose(trace.y, artifact.array("mean", unit))
    assert np.allclose(stds[1].y, artifact.array("std", "blocks.2"))


def test_cluster_and_matrix_figures(run_path):
    kmeans = analyze(run_path, "kmeans", layers="blocks.0", params={"k_max": 4})
    fig = figure_for_artifact(kmeans)
    assert np.array_equal(fig.data[0].x, kmeans.array("k_values"))
    assert np.allclose(fig.data[0].y, kmeans.array("silhouette_by_k"))
    sizes = kmeans.metrics()["cluster_sizes"]
    assert sum(fig.data[1].y) == 60 and len(fig.data[1].y) == len(sizes)

    tree = analyze(run_path, "hierarchical", layers="blocks.0", params={"k_max": 4})
    fig = figure_for_artifact(tree)
    assert np.allclose(_no_none(fig.data[0].x), np.ravel(tree.array("dendrogram_icoord")))
    assert np.allclose(_no_none(fig.data[0].y), np.ravel(tree.array("dendrogram_dcoord")))

    corr = analyze(run_path, "correlation", layers="blocks.2")
    assert np.allclose(figure_for_artifact(corr).data[0].z, corr.array("correlation"))


def test_evolution_lines_hold_the_metrics(run_path):
    artifact = analyze(run_path, "evolution", layers="blocks.*")
    fig = figure_for_artifact(artifact)
    cka = [artifact.metrics(u)["cka_prev"] for u in artifact.units]
    assert fig.data[0].name == "cka_prev" and np.allclose(fig.data[0].y, cka)
    assert list(fig.data[0].x) == ["blocks.0 → blocks.1", "blocks.1 → blocks.2"]


class FakeArtifact:
    """An in-memory artifact of an analysis no builder knows (e.g. a plugin's)."""

    def __init__(self):
        self.result = {"id": "custom-1", "analysis": "custom-score", "units": {
            "blocks.0": {"metrics": {"accuracy": 0.9, "name": "x", "n": 10}},
            "blocks.1": {"metrics": {"accuracy": 0.7, "n": 12}}}}
        self.arrays = {}

    def table(self, name):
        raise KeyError(name)


def test_unknown_analyses_get_bars_of_their_numeric_metrics():
    fig = figure_for_artifact(FakeArtifact())
    assert [t.name for t in fig.data] == ["accuracy", "n"]
    assert np.allclose(fig.data[0].y, [0.9, 0.7]) and list(fig.data[0].x) == ["blocks.0", "blocks.1"]


def test_cosine_of_a_per_token_run_draws_every_token_row(tmp_path):
    """Token rows of one prompt share a sample id; as plotly category labels they merged, and a 30-row matrix
    was drawn as 6 rows. Each row now has its own label and the heatmap holds the whole matrix."""
    from neuronmap.store import Manifest, RunWriter

    n_samples, per_sample, d = 6, 5, 4
    rows = n_samples * per_sample
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    manifest = Manifest.new(model="synthetic", config_hash="c", tokenizer="none",
                            layers={"blocks.0": dict(shape=[d], dtype="float32", kind="hidden", per_token=True)},
                            pooling="none", dtype="float32", prompt_source="synthetic", prompt_source_hash="h",
                            n_samples=n_samples, n_tokens=rows)
    writer = RunWriter(tmp_path / "run", manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"prompt {i}" for i in range(n_samples)]}))
    writer.write_shard("blocks.0", 0, rows=(0, rows), samples=(0, n_samples), activations=x,
                       sample_ids=np.repeat(np.arange(n_samples), per_sample),
                       token_index=np.tile(np.arange(per_sample, dtype=np.int32), n_samples))
    writer.complete()
    artifact = analyze(tmp_path / "run", "cosine", layers="blocks.0")
    heat = figure_for_artifact(artifact).data[0]
    assert len(set(heat.y)) == len(heat.y) == rows and list(heat.x) == list(heat.y)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), unit @ unit.T, atol=1e-5)
    assert heat.y[0] == "#0·0" and heat.y[per_sample] == "#1·0"


def test_probe_figure_holds_probe_and_control_scores_per_layer(run_path):
    """The probe had no figure of its own: generic bars put n_rows on the accuracies' axis."""
    artifact = analyze(run_path, "probe", layers="blocks.*", labels="topic", params={"n_splits": 3})
    fig = figure_for_artifact(artifact)
    units = list(artifact.result["units"])
    assert [list(trace.x) for trace in fig.data] == [units, units]
    assert list(fig.data[0].y) == [artifact.metrics(u)["accuracy_mean"] for u in units]
    assert list(fig.data[1].y) == [artifact.metrics(u)["control_accuracy"] for u in units]
    assert list(fig.data[0].error_y.array) == [artifact.metrics(u)["accuracy_std"] for u in units]
    assert fig.layout.yaxis.title.text == "accuracy, mean over folds"
