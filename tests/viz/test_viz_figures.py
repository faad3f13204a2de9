"""Figure builders: the data in each figure equals its input; decimation is capped, seeded and balanced."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("plotly", reason="plotly is part of the dashboard extra (pip install -e '.[dashboard]')")

from neuronmap import viz  # noqa: E402


def _points(fig) -> np.ndarray:
    return np.concatenate([np.column_stack([np.asarray(t.x, float), np.asarray(t.y, float)]) for t in fig.data])


# -- decimation --------------------------------------------------------------------------------------------
def test_decimate_keeps_everything_under_the_cap():
    assert viz.decimate(10, 20).tolist() == list(range(10))


def test_decimate_caps_sorts_and_is_deterministic():
    first = viz.decimate(100_000, 20_000, seed=3)
    assert len(first) == 20_000 and len(np.unique(first)) == 20_000
    assert np.all(np.diff(first) > 0) and first.min() >= 0 and first.max() < 100_000
    assert np.array_equal(first, viz.decimate(100_000, 20_000, seed=3))
    assert not np.array_equal(first, viz.decimate(100_000, 20_000, seed=4))


def test_decimate_keeps_label_balance_and_rare_labels():
    labels = np.array(["a"] * 70_000 + ["b"] * 29_990 + ["rare"] * 10)
    keep = viz.decimate(len(labels), 20_000, labels, seed=0)
    assert len(keep) == 20_000
    counts = {k: int(np.sum(labels[keep] == k)) for k in ("a", "b", "rare")}
    assert abs(counts["a"] - 14_000) <= 1 and abs(counts["b"] - 5_998) <= 1 and counts["rare"] == 2
    one = np.array(["x"] * 999 + ["y"])
    assert "y" in one[viz.decimate(1000, 10, one)]  # a label smaller than its share keeps one point


def test_decimate_rejects_a_bad_cap():
    with pytest.raises(ValueError, match="max_points=0"):
        viz.decimate(10, 0)


# -- scatter ---------------------------------------------------------------------------------------------
def test_scatter_traces_hold_the_input_points_per_label():
    rng = np.random.default_rng(0)
    coords = rng.standard_normal((50, 2))
    labels = np.array(["pos", "neg"] * 25)
    ids = np.arange(100, 150)
    texts = [f"prompt <{i}>" for i in range(50)]
    fig = viz.embedding_scatter(coords, color=labels, hover=texts, ids=ids)
    assert [t.name for t in fig.data] == ["neg", "pos"]
    for trace in fig.data:
        mask = labels == trace.name
        assert np.allclose(np.column_stack([trace.x, trace.y]), coords[mask])
        assert np.array_equal(np.asarray(trace.customdata), ids[mask])
        assert list(trace.hovertext) == [f"prompt &lt;{i}&gt;" for i in np.flatnonzero(mask)]
    assert fig.layout.meta == {"n_points": 50, "n_shown": 50}


def test_scatter_3d_and_cluster_ids_in_numeric_order():
    coords = np.arange(36, dtype=float).reshape(12, 3)
    clusters = np.array([10, 2, 2, 10, 1, 1, 2, 10, 1, 2, 10, 1])
    fig = viz.embedding_scatter(coords, color=clusters)
    assert [t.name for t in fig.data] == ["1", "2", "10"]
    assert fig.data[0].type == "scatter3d"
    got = np.column_stack([fig.data[2].x, fig.data[2].y, fig.data[2].z])
    assert np.array_equal(got, coords[clusters == 10])


def test_scatter_decimates_to_the_cap_deterministically():
    rng = np.random.default_rng(1)
    coords = rng.standard_normal((30_000, 2))
    labels = np.where(np.arange(30_000) % 3 == 0, "a", "b")
    fig = viz.embedding_scatter(coords, color=labels, max_points=20_000, seed=0)
    shown = _points(fig)
    assert len(shown) == 20_000 and fig.layout.meta["n_shown"] == 20_000
    keep = viz.decimate(30_000, 20_000, labels, seed=0)
    assert np.allclose(np.sort(shown, axis=0), np.sort(coords[keep], axis=0))
    again = _points(viz.embedding_scatter(coords, color=labels, max_points=20_000, seed=0))
    assert np.array_equal(shown, again)
    assert fig.data[0].type == "scattergl"


def test_pca_scatter_axis_titles_and_dims_check():
    projection = np.arange(20, dtype=float).reshape(10, 2)
    fig = viz.pca_scatter(projection, [0.5, 0.25])
    assert fig.layout.xaxis.title.text == "PC1 (50.0%)" and np.array_equal(fig.data[0].x, projection[:, 0])
    with pytest.raises(ValueError, match="project=3"):
        viz.pca_scatter(projection, dims=3)


def test_continuous_colour_is_one_trace_with_a_scale():
    coords = np.random.default_rng(2).standard_normal((100, 2))
    values = np.linspace(0, 1, 100)
    fig = viz.embedding_scatter(coords, color=values)
    assert len(fig.data) == 1 and np.allclose(fig.data[0].marker.color, values)


# -- heatmaps ---------------------------------------------------------------------------------------------
def test_activation_heatmap_is_the_top_k_columns():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 10))
    x[:, 7] *= 10
    x[:, 3] *= 5
    fig = viz.activation_heatmap(x, top_k=3, row_labels=[f"s{i}" for i in range(20)])
    order = np.argsort(-np.abs(x).mean(axis=0), kind="stable")[:3]
    assert order[:2].tolist() == [7, 3]
    assert np.allclose(fig.data[0].z, x[:, order])
    assert list(fig.data[0].x) == [f"n{i}" for i in order] and fig.data[0].y[0] == "s0"
    fixed = viz.activation_heatmap(x, neurons=[1, 0])
    assert np.allclose(fixed.data[0].z, x[:, [1, 0]])


def test_correlation_and_cka_heatmaps_hold_their_matrices():
    r = np.corrcoef(np.random.default_rng(0).standard_normal((5, 30)))
    fig = viz.correlation_matrix(r, neurons=[4, 8, 15, 16, 23])
    assert np.allclose(fig.data[0].z, r) and list(fig.data[0].x) == ["n4", "n8", "n15", "n16", "n23"]
    assert (fig.data[0].zmin, fig.data[0].zmax) == (-1.0, 1.0)
    m = np.array([[1.0, 0.5, np.nan], [0.5, 1.0, 0.2], [np.nan, 0.2, 1.0]])
    fig = viz.cka_heatmap(m, ["a", "b", "c"], ["x", "y", "z"])
    assert np.allclose(fig.data[0].z, m, equal_nan=True)
    assert list(fig.data[0].y) == ["a", "b", "c"] and list(fig.data[0].x) == ["x", "y", "z"]


def test_attention_heatmap_picks_the_head_and_keeps_repeated_tokens_apart():
    pattern = np.random.default_rng(0).random((2, 3, 3))
    fig = viz.attention_heatmap(pattern, tokens=["the", "cat", "the"], head=1)
    assert np.allclose(fig.data[0].z, pattern[1])
    assert list(fig.data[0].x) == ["0:the", "1:cat", "2:the"]
    with pytest.raises(ValueError, match="head=2"):
        viz.attention_heatmap(pattern, head=2)


# -- charts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["violin", "histogram", "box"])
def test_layer_distributions_hold_each_layers_values(kind):
    values = {"blocks.0": np.arange(6.0), "blocks.1": np.arange(4.0) * 2}
    fig = viz.layer_distributions(values, kind=kind)
    axis = "x" if kind == "histogram" else "y"
    assert [t.name for t in fig.data] == ["blocks.0", "blocks.1"]
    for trace, expected in zip(fig.data, values.values()):
        assert np.array_equal(getattr(trace, axis), expected)


def test_lines_bars_and_evolution():
    fig = viz.layer_evolution([("blocks.0", "blocks.1"), ("blocks.1", "blocks.2")],
                              {"cka_prev": [0.9, 0.8], "norm_growth": [1.1, None]})
    assert list(fig.data[0].x) == ["blocks.0 → blocks.1", "blocks.1 → blocks.2"]
    assert np.allclose(fig.data[0].y, [0.9, 0.8]) and np.isnan(fig.data[1].y[1])
    bars = viz.neuron_ranking([5, 2, 9], [3.0, 2.0, 1.0], value_title="mean |x|")
    assert list(bars.data[0].y) == ["n5", "n2", "n9"] and np.allclose(bars.data[0].x, [3, 2, 1])
    ev = viz.explained_variance({"blocks.0": [0.5, 0.3, 0.2]})
    assert np.allclose(ev.data[0].y, [0.5, 0.8, 1.0]) and list(ev.data[0].x) == [1, 2, 3]
    grouped = viz.metric_bars(["a", "b"], {"twonn": [3.0, 4.0]})
    assert list(grouped.data[0].x) == ["a", "b"] and np.allclose(grouped.data[0].y, [3, 4])


def test_dendrogram_equals_scipys_coordinates():
    from scipy.cluster.hierarchy import dendrogram, linkage

    x = np.random.default_rng(0).standard_normal((12, 3))
    z = linkage(x, "ward")
    reference = dendrogram(z, no_plot=True)
    fig = viz.dendrogram_from_linkage(z)
    xs = [v for v in fig.data[0].x if v is not None]
    ys = [v for v in fig.data[0].y if v is not None]
    assert np.allclose(xs, np.ravel(reference["icoord"])) and np.allclose(ys, np.ravel(reference["dcoord"]))
    assert list(fig.layout.xaxis.ticktext) == [str(v) for v in reference["ivl"]]


def test_points_without_finite_coordinates_are_left_out_and_counted():
    """A NaN point was counted as drawn, and one NaN ratio turned the rest of a cumulative line into NaN."""
    from neuronmap.viz import embedding_scatter, explained_variance

    coords = np.arange(20, dtype=float).reshape(10, 2)
    coords[3, 1] = np.nan
    coords[7, 0] = np.inf
    fig = embedding_scatter(coords, color=["a", "b"] * 5, ids=np.arange(10))
    drawn = sorted(i for trace in fig.data for i in trace.customdata)
    assert drawn == [0, 1, 2, 4, 5, 6, 8, 9] and fig.layout.meta["n_shown"] == 8
    assert "showing 8 of 10 points (seeded sample; 2 without finite coordinates)" in fig.layout.annotations[0].text
    line = explained_variance({"blocks.0": [0.5, np.nan, 0.25]}).data[0]
    np.testing.assert_allclose(line.y, [0.5, 0.5, 0.75])
