"""The numbers behind the Layer explorer and Compare (against numpy / scikit-learn) and their caches.

A second visit, also from a restarted app, reads no shard (counted at `ShardReader`); a run whose
shards change misses the cache and shows the new data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("dash", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")

from dashboards import diskcache, layerview  # noqa: E402
from dashboards.components import Context  # noqa: E402
from dashboards.data import Repository, sample_positions  # noqa: E402
from dashboards.pages import compare, layer  # noqa: E402
from dashboards.prefetch import Prefetcher  # noqa: E402
from dashboards.reduce import linear_cka_matrix, sample_pca  # noqa: E402
from neuronmap.store import Manifest, RunWriter  # noqa: E402
from neuronmap.store import shards as shard_module  # noqa: E402

N, D, SHARD = 1200, 12, 400
LAYERS = ["blocks.0", "blocks.1", "blocks.2"]


def layer_data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((N, D)).astype(np.float32) * np.linspace(3, 0.2, D, dtype=np.float32)
    return {name: (base @ rng.standard_normal((D, D)).astype(np.float32) * (i + 1)
                   + 0.3 * rng.standard_normal((N, D)).astype(np.float32)) for i, name in enumerate(LAYERS)}


def write_run(path, data, format="hdf5", overwrite=False, complete=True):
    manifest = Manifest.new(model="synthetic", config_hash="x", tokenizer="none",
                            layers={k: dict(shape=[D], dtype="float32", kind="hidden", per_token=False) for k in LAYERS},
                            pooling="mean", dtype="float32", prompt_source="synthetic", prompt_source_hash="x",
                            n_samples=N, format=format)
    writer = RunWriter(path, manifest, overwrite=overwrite)
    writer.write_prompts(pd.DataFrame({"text": [f"prompt {i}" for i in range(N)], "topic": [f"t{i % 3}" for i in range(N)]}))
    for index, start in enumerate(range(0, N, SHARD)):
        for name in LAYERS:
            writer.write_shard(name, index, rows=(start, start + SHARD), samples=(start, start + SHARD),
                               activations=data[name][start:start + SHARD],
                               sample_ids=np.arange(start, start + SHARD, dtype=np.int64))
    if complete:
        writer.complete()
    return writer


@pytest.fixture
def reads(monkeypatch):
    """Counts shard files opened (every read of activations goes through a ShardReader)."""
    count = {"n": 0}
    original = shard_module.ShardReader.__init__

    def counting(self, *args, **kwargs):
        count["n"] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(shard_module.ShardReader, "__init__", counting)
    return count


@pytest.fixture
def synthetic(tmp_path):
    data = layer_data(0)
    write_run(tmp_path / "runs" / "synth", data)
    return tmp_path / "runs", data


def visit_layer_page(repo, name):
    """What a Layer explorer visit computes: its layout, the scatter, distribution and heatmap data."""
    layer.layout(Context(repo, None), {"run": "synth", "layer": name})
    return layerview.summary(repo, "synth", name), layerview.projection(repo, "synth", name)


@pytest.mark.parametrize("format", ["hdf5", "parquet"])
def test_sample_rows_read_per_shard_equal_the_run(tmp_path, format):
    data = layer_data(1)
    write_run(tmp_path / "runs" / "synth", data, format=format)
    repo = Repository(tmp_path / "runs")
    sample = repo.layer_sample("synth", "blocks.1", max_rows=500)
    assert len(sample.x) == 500 and np.all(np.diff(sample.rows) > 0)
    np.testing.assert_array_equal(sample.x, data["blocks.1"][sample.rows])
    np.testing.assert_array_equal(sample.sample_ids, sample.rows)  # sample ids were written as 0..N-1
    assert len(np.unique(sample.rows // SHARD)) == 3  # spread over every shard


def test_sample_positions_are_seeded_blocks_within_range():
    a, b = sample_positions(100_000, 20_000, seed=0), sample_positions(100_000, 20_000, seed=0)
    assert np.array_equal(a, b) and len(a) == 20_000 and len(np.unique(a)) == 20_000
    assert a.min() >= 0 and a.max() < 100_000 and np.all(np.diff(a) > 0)
    assert np.array_equal(sample_positions(50, 100), np.arange(50))


def test_layer_summary_equals_numpy_and_sklearn(synthetic):
    from sklearn.decomposition import PCA

    root, data = synthetic
    x = data["blocks.1"].astype(np.float64)
    repo = Repository(root)
    found, projection = layerview.summary(repo, "synth", "blocks.1"), layerview.projection(repo, "synth", "blocks.1")
    assert found.n_rows == N and found.n_sample == N  # fewer rows than the sample size: all of them
    np.testing.assert_array_equal(projection.rows, np.arange(N))
    np.testing.assert_array_equal(projection.sample_ids, np.arange(N))
    stats = found.stats
    np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["std"], x.std(0), rtol=1e-6)
    np.testing.assert_allclose(stats["min"], x.min(0))
    np.testing.assert_allclose(stats["mean_abs"], np.abs(x).mean(0), rtol=1e-6)
    reference = PCA(n_components=3, svd_solver="full").fit(x)
    coords = reference.transform(x)
    for i in range(3):  # components are defined up to sign
        sign = np.sign(coords[:, i] @ projection.coords[:, i])
        np.testing.assert_allclose(projection.coords[:, i] * sign, coords[:, i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(projection.explained, reference.explained_variance_ratio_, rtol=1e-6)
    assert "sample of 1,200 of 1,200 rows" in projection.source
    top = np.argsort(-np.abs(x).mean(0), kind="stable")[:layerview.HEAT_NEURONS]
    np.testing.assert_array_equal(found.top, top)
    np.testing.assert_array_equal(found.heat_x, data["blocks.1"][np.isin(np.arange(N), found.heat_ids)])


def test_randomized_pca_for_wide_layers_matches_the_exact_one():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3000, 3)) * [10, 6, 3]) @ rng.standard_normal((3, 700)) + rng.standard_normal((3000, 700))
    coords, ratio = sample_pca(x.astype(np.float32), k=3)  # 700 > EXACT_PCA_FEATURES: randomized, fit on 3000 rows
    exact = PCA(n_components=3, svd_solver="full").fit(x)
    for i in range(3):
        assert abs(np.corrcoef(coords[:, i], exact.transform(x)[:, i])[0, 1]) > 0.999
    np.testing.assert_allclose(ratio, exact.explained_variance_ratio_, rtol=1e-3)


def reference_cka(x, y):
    """Kornblith et al.'s HSIC form with an explicit centring matrix H (n x n); small n only."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def gram_cka(x, y):
    """The same from the Gram matrices of column-centred data (HKH = X_c X_c^T)."""
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def test_cka_matrix_equals_the_hsic_definition_for_narrow_wide_and_mixed_layers():
    from neuronmap.analysis.cka import linear_cka

    rng = np.random.default_rng(5)
    n = 60
    narrow = rng.standard_normal((n, 8))
    wide = np.hstack([narrow @ rng.standard_normal((8, 40)), rng.standard_normal((n, 50))])  # 90 > n features
    other = rng.standard_normal((n, 20)) + narrow[:, :1]
    xs = [narrow, wide, other]
    matrix = linear_cka_matrix(xs)
    for i, a in enumerate(xs):
        for j, b in enumerate(xs):
            assert matrix[i, j] == pytest.approx(reference_cka(a, b), rel=1e-9, abs=1e-12)
    between = linear_cka_matrix(xs[:2], [other, wide])
    assert between[0, 0] == pytest.approx(linear_cka(narrow, other), rel=1e-9)
    assert between[1, 1] == pytest.approx(1.0)
    assert np.isnan(linear_cka_matrix([narrow, np.ones((n, 3))])[0, 1])  # a constant layer: no CKA


def test_second_visit_and_restart_read_no_shard_and_a_changed_run_is_recomputed(synthetic, reads):
    root, data = synthetic
    repo = Repository(root)
    first, first_projection = visit_layer_page(repo, "blocks.0")
    matrix, *_ = compare.cka_matrix(repo, "synth", None)
    assert reads["n"] > 0
    expected = np.array([[gram_cka(data[a].astype(np.float64), data[b].astype(np.float64)) for b in LAYERS]
                         for a in LAYERS])  # N < compare.SAMPLE: every sample
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)
    cache_files = sorted(p.name for p in (root / "synth" / diskcache.CACHE_DIR).iterdir())
    assert [name.split("-")[0] for name in cache_files] == ["cka", "pca", "summary"]

    reads["n"] = 0
    visit_layer_page(repo, "blocks.0")  # same app, second visit
    compare.cka_matrix(repo, "synth", None)
    assert reads["n"] == 0
    restarted = Repository(root)  # a new process: memory empty, disk cache warm
    again, again_projection = visit_layer_page(restarted, "blocks.0")
    again_matrix, *_ = compare.cka_matrix(restarted, "synth", None)
    assert reads["n"] == 0
    np.testing.assert_array_equal(again_projection.coords, first_projection.coords)
    np.testing.assert_array_equal(again.stats.to_numpy(), first.stats.to_numpy())
    np.testing.assert_array_equal(again_matrix, matrix)

    changed = layer_data(7)  # the run is re-extracted with other values: new shard hashes, new manifest time
    write_run(root / "synth", changed, overwrite=True)
    after, _ = visit_layer_page(Repository(root), "blocks.0")
    assert reads["n"] > 0
    np.testing.assert_allclose(after.stats["mean"], changed["blocks.0"].astype(np.float64).mean(0), rtol=1e-6,
                               atol=1e-9)
    summaries = [p for p in (root / "synth" / diskcache.CACHE_DIR).iterdir() if p.name.startswith("summary")]
    assert len(summaries) == 1  # the stale entry was replaced, not kept beside


def test_digest_changes_when_a_shard_is_rewritten(tmp_path):
    data = layer_data(2)
    writer = write_run(tmp_path / "synth", data, complete=False)
    repo = Repository(tmp_path)
    before = {name: diskcache.run_digest(repo.run("synth"), [name]) for name in LAYERS}
    before_both = diskcache.run_digest(repo.run("synth"), ["blocks.0", "blocks.1"])
    writer.write_shard("blocks.0", 0, rows=(0, SHARD), samples=(0, SHARD), activations=data["blocks.0"][:SHARD] + 1,
                       sample_ids=np.arange(SHARD, dtype=np.int64))
    after = Repository(tmp_path).run("synth")
    assert diskcache.run_digest(after, ["blocks.0"]) != before["blocks.0"]  # a new sha256, whatever the clock says
    assert diskcache.run_digest(after, ["blocks.0", "blocks.1"]) != before_both


def test_prefetch_warms_summaries_and_cka_for_a_later_visit(synthetic, reads):
    root, _ = synthetic
    prefetch = Prefetcher(Repository(root))
    assert prefetch.schedule("synth") and not prefetch.schedule("synth")  # queued once per manifest version
    prefetch.wait()
    reads["n"] = 0
    repo = Repository(root)
    for name in LAYERS:
        visit_layer_page(repo, name)
    compare.cka_matrix(repo, "synth", None)
    assert reads["n"] == 0


def test_an_unwritable_run_folder_only_loses_the_disk_cache(synthetic):
    root, data = synthetic
    cache = root / "synth" / ".cache"
    cache.write_text("not a folder")  # mkdir of .cache/dashboard fails
    found = layerview.summary(Repository(root), "synth", "blocks.2")
    np.testing.assert_allclose(found.stats["max"], data["blocks.2"].max(0))
