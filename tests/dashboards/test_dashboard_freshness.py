"""The dashboard shows an artifact's numbers as exact only when the artifact covers the run as it is now,
and says plainly what it cannot show (3-D of a 2-coordinate PCA, pooled vs per-token CKA, a deleted run).

References are numpy on the run's arrays; the runs are tiny GPT-2 extractions built here (a resumed run is
made by analysing a copy of the manifest cut to its first shards, then putting the whole manifest back).
"""

from __future__ import annotations

import html
import json
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from dashtest_util import HEADS_ID, RUN_ID

pytest.importorskip("dash", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")

from dashboards import layerview  # noqa: E402
from dashboards.data import Repository  # noqa: E402
from dashboards.pages import analysis_artifact, compare, layer  # noqa: E402
from neuronmap.analysis import analyze  # noqa: E402
from neuronmap.analysis.runner import is_current  # noqa: E402
from neuronmap.errors import ConfigError  # noqa: E402

LAYER = "blocks.0"


def _prompts(n: int):
    import pandas as pd

    import neuronmap

    questions = pd.read_csv(Path(neuronmap.__file__).parent / "data" / "questions.csv")
    return questions.head(n)[["text", "topic"]].reset_index(drop=True)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """resumed: 24 prompts in shards of 8 with stats/pca artifacts of its first shard only (as if analysed
    while it was still running); pooled/tokens: the same 6 prompts, mean-pooled and per token; two: 2 prompts."""
    import neuronmap

    root = tmp_path_factory.mktemp("freshness") / "runs"
    model = str(tiny_model_dir("gpt2"))
    extract = lambda prompts, out, **kw: _quiet(neuronmap.extract, model, prompts, layers="blocks.*",  # noqa: E731
                                                out=root / out, progress=False, **kw)
    extract(_prompts(24), "resumed", pooling="mean", samples_per_shard=8)
    extract(_prompts(6), "pooled", pooling="mean")
    extract(_prompts(6), "tokens", pooling="none")
    extract(_prompts(2), "two", pooling="mean")

    manifest = root / "resumed" / "manifest.json"
    whole = manifest.read_text()
    doc = json.loads(whole)
    doc["status"] = "running"
    doc["shards"] = [s for s in doc["shards"] if s["rows"][1] <= 8]
    manifest.write_text(json.dumps(doc))
    stale = {name: _quiet(analyze, root / "resumed", name, layers=LAYER, **kw).id
             for name, kw in (("stats", {}), ("pca", {"params": {"project": 3}}))}
    manifest.write_text(whole)  # the run resumed and completed
    return root, stale


def _x(root: Path, run_id: str, layer: str = LAYER) -> np.ndarray:
    from neuronmap.store import open_run

    values = open_run(root / run_id).array(layer)
    return values.reshape(len(values), -1).astype(np.float64)


def _pca_abs(x: np.ndarray, k: int) -> np.ndarray:
    """|principal coordinates| (signs differ between implementations) of `x`, numpy SVD."""
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return np.abs(u[:, :k] * s[:k])


def _cka(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return float(np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def _post(client, outputs, inputs, state=()):
    """The request the browser sends for a callback (Dash's /_dash-update-component protocol)."""
    targets = [dict(zip(("id", "property"), o.split("."))) for o in outputs]
    many = len(outputs) > 1
    body = {"output": (".." + "...".join(outputs) + "..") if many else outputs[0],
            "outputs": targets if many else targets[0], "inputs": list(inputs), "state": list(state),
            "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}
    return client.post("/_dash-update-component", json=body)


def click(row: int) -> dict:
    """The clickData input of a click on the scatter point of layer row `row`."""
    return {"id": "layer-scatter", "property": "clickData", "value": {"points": [{"customdata": [row]}]}}


# -- 1. stale artifacts -----------------------------------------------------------------------------------
def test_artifacts_of_an_earlier_state_of_the_run_are_not_shown_as_exact(runs):
    root, stale = runs
    repo = Repository(root)
    x = _x(root, "resumed")
    assert len(x) == 24
    old = repo.artifact("resumed", stale["stats"])
    assert old.result["units"][LAYER]["rows"] == 8 and repo.current("resumed", old) is False
    assert is_current(repo.run("resumed"), repo.artifact("resumed", stale["pca"])) is False

    stats, source = layerview.neuron_stats(repo, "resumed", LAYER)
    assert source.startswith("estimated on a seeded sample of 24 of 24 rows")
    assert f"{stale['stats']} was computed on an earlier state of the run (8 rows" in source
    np.testing.assert_allclose(stats["mean"], x.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["std"], x.std(axis=0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["max"], x.max(axis=0), rtol=1e-6)
    # the artifact's own numbers are those of the first 8 rows, not of the layer
    first = old.table("neurons")
    assert not np.allclose(first["mean"].to_numpy(), x.mean(axis=0), rtol=1e-3)

    proj = layerview.projection(repo, "resumed", LAYER, "pca", 3)
    assert "artifact" not in proj.source.split(";")[0] and sorted(proj.rows.tolist()) == list(range(24))
    np.testing.assert_allclose(np.abs(proj.coords[np.argsort(proj.rows)]), _pca_abs(x, 3), rtol=1e-3, atol=1e-5)

    # the Artifact page still lists it, marked as computed on an earlier state of the run
    page = analysis_artifact.layout(SimpleNamespace(repository=repo), {"run": "resumed", "id": stale["stats"]})
    assert "earlier state of the run" in str(page)
    from dashboards.pages import run as run_page

    listed = str(run_page._artifacts_list(SimpleNamespace(repository=repo), "resumed"))
    assert listed.count("stale-artifact") == len(stale)  # every artifact of the first 8 rows, badged

    fresh = _quiet(analyze, root / "resumed", "stats", layers=LAYER)
    repo = Repository(root)
    assert repo.current("resumed", fresh) is True and fresh.id != stale["stats"]
    stats, source = layerview.neuron_stats(repo, "resumed", LAYER)
    assert source == f"exact, from artifact {fresh.id}"
    np.testing.assert_allclose(stats["mean"], x.mean(axis=0), rtol=1e-5, atol=1e-7)
    page = analysis_artifact.layout(SimpleNamespace(repository=repo), {"run": "resumed", "id": fresh.id})
    assert "earlier state of the run" not in str(page)


# -- 2. CKA artifact picked by the view -------------------------------------------------------------------
def test_compare_uses_the_cka_artifact_that_matches_the_view(runs_dir, tmp_path):
    root = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(runs_dir[0] / RUN_ID, root / name, ignore=shutil.ignore_patterns("analyses", ".neuronmap*"))
    within = _quiet(analyze, root / "a", "cka", layers="blocks.*")
    time.sleep(1.1)  # `created` has a one-second resolution: make the cross-run one the newest
    across = _quiet(analyze, root / "a", "cka", layers="blocks.*", params={"other_run": str(root / "b")})
    repo = Repository(root)
    assert repo.newest("a", "cka").id == across.id

    layers = within.result["layers"]
    xs = {name: _x(root, "a", name) for name in layers}
    ys = {name: _x(root, "b", name) for name in layers}
    matrix, rows, columns, source = compare.cka_matrix(repo, "a", None)
    assert source == f"exact, from artifact {within.id}" and rows == columns == layers
    np.testing.assert_allclose(matrix, [[_cka(xs[r], xs[c]) for c in columns] for r in rows], rtol=1e-6, atol=1e-9)

    matrix, rows, columns, source = compare.cka_matrix(repo, "a", "b")
    assert source == f"exact, from artifact {across.id}"
    np.testing.assert_allclose(matrix, [[_cka(xs[r], ys[c]) for c in columns] for r in rows], rtol=1e-6, atol=1e-9)


# -- 3. pooled against per-token --------------------------------------------------------------------------
def test_compare_refuses_pooled_against_per_token_rows_and_counts_token_rows(runs):
    root, _ = runs
    repo = Repository(root)
    with pytest.raises(ConfigError, match="per-token and per-prompt runs cannot be compared row by row"):
        compare.cka_matrix(repo, "pooled", "tokens")
    with pytest.raises(ConfigError, match="same pooling"):
        compare.cka_matrix(repo, "tokens", "pooled")

    matrix, rows, columns, source = compare.cka_matrix(repo, "tokens", None)
    xs = {name: _x(root, "tokens", name) for name in rows}
    n = len(xs[rows[0]])
    assert n <= compare.SAMPLE and f"seeded sample of {n:,} token rows" in source
    np.testing.assert_allclose(matrix, [[_cka(xs[r], xs[c]) for c in columns] for r in rows], rtol=1e-5, atol=1e-7)


# -- 4. 3-D with a 2-coordinate PCA artifact ---------------------------------------------------------------
def test_three_d_falls_back_to_the_sample_pca_and_the_artifact_page_disables_it(runs):
    root, _ = runs
    artifact = _quiet(analyze, root / "pooled", "pca", layers=LAYER)  # project=2 by default
    repo = Repository(root)
    x = _x(root, "pooled")

    fig, caption = layer.draw_scatter(repo, "pooled", LAYER, "pca", 2, None)
    assert caption.startswith(f"PCA artifact {artifact.id}")
    fig, caption = layer.draw_scatter(repo, "pooled", LAYER, "pca", 3, None)
    assert fig.data and fig.data[0].type == "scatter3d", caption
    assert f"artifact {artifact.id} stores 2 coordinates" in caption
    drawn = np.column_stack([fig.data[0].x, fig.data[0].y, fig.data[0].z]).astype(float)
    rows = np.asarray(fig.data[0].customdata).reshape(len(drawn), -1)[:, 0].astype(int)
    np.testing.assert_allclose(np.abs(drawn), _pca_abs(x, 3)[rows], rtol=1e-3, atol=1e-5)

    page = str(analysis_artifact.layout(SimpleNamespace(repository=repo), {"run": "pooled", "id": artifact.id}))
    assert "'value': 3, 'disabled': True" in page and "--param project=3" in page


def test_artifact_page_keeps_three_d_for_a_three_coordinate_pca(runs_dir):
    repo = Repository(runs_dir[0])
    page = str(analysis_artifact.layout(SimpleNamespace(repository=repo), {"run": RUN_ID, "id": runs_dir[1]["pca"]}))
    assert "'value': 3, 'disabled': False" in page and "--param project=3" not in page


# -- 5. a run deleted while its Layer page is open ---------------------------------------------------------
def test_layer_callbacks_answer_with_a_message_when_the_run_is_deleted(runs_dir, tmp_path):
    from dashboards.app import create_app

    root = tmp_path / "runs"
    shutil.copytree(runs_dir[0] / RUN_ID, root / "gone", ignore=shutil.ignore_patterns("analyses", ".neuronmap*"))
    app = create_app(root, workers=1, prefetch=False)
    client = app.server.test_client()
    key = {"id": "layer-key", "property": "data", "value": {"run": "gone", "layer": LAYER}}
    post = lambda outputs, inputs, state=(): _post(client, outputs, inputs, state)  # noqa: E731

    dist_what = {"id": "dist-what", "property": "value", "value": "values"}
    dist_kind = {"id": "dist-kind", "property": "value", "value": "histogram"}
    scatter = lambda: post(["layer-scatter.figure", "scatter-source.children"],  # noqa: E731
                           [{"id": "scatter-method", "property": "value", "value": "pca"},
                            {"id": "scatter-colour", "property": "value", "value": "*"},
                            {"id": "scatter-dims", "property": "value", "value": 2}], [key])
    heat = lambda: post(["layer-heatmap.figure"], [key])  # noqa: E731
    assert scatter().status_code == 200 and heat().status_code == 200
    try:
        shutil.rmtree(root / "gone")
        for response in (scatter(), heat(),
                         post(["layer-distribution.figure"], [dist_what, dist_kind], [key]),
                         post(["point-details.children"], [click(0)], [key])):
            assert response.status_code == 200, response.get_data(as_text=True)[:300]
            assert "gone" in response.get_data(as_text=True)
    finally:
        app.neuronmap.jobs.shutdown()


# -- 6. attention-pattern layers ---------------------------------------------------------------------------
def test_attention_pattern_layers_say_what_their_neurons_are(runs_dir):
    repo = Repository(runs_dir[0])
    run = repo.run(HEADS_ID)
    name = next(n for n in run.layers if run.layer_info(n).kind == "pattern")
    heads, keys = run.layer_info(name).shape
    page = str(layer.layout(SimpleNamespace(repository=repo), {"run": HEADS_ID, "layer": name}))
    assert "pattern-note" in page and f"{heads} heads x {keys} key positions" in page and "/attention?" in page
    plain = str(layer.layout(SimpleNamespace(repository=repo), {"run": RUN_ID, "layer": LAYER}))
    assert "pattern-note" not in plain


# -- 7. wording for tiny runs, the token of a per-token row -------------------------------------------------
def test_caption_of_a_two_prompt_run_reads_plainly(runs):
    root, _ = runs
    repo = Repository(root)
    fig, caption = layer.draw_scatter(repo, "two", LAYER, "pca", 2, None)
    assert caption == "PCA computed on a seeded sample of 2 of 2 rows; 2 points drawn"
    fig, caption = layer.draw_scatter(repo, "two", LAYER, "pca", 3, None)
    assert fig == {} and caption == ("No 3-D view: 2 rows give only 2 principal coordinates (PCA computed on a "
                                     "seeded sample of 2 of 2 rows).")


def test_a_per_token_row_shows_its_token_position_and_text(runs, tiny_model_dir):
    """Hover and click name each token row's position in its prompt and the token there (reference: the
    model's own tokenizer on the prompt text); a per-prompt layer names none."""
    from transformers import AutoTokenizer

    root, _ = runs
    repo = Repository(root)
    ids = repo.run("tokens").sample_ids(LAYER)
    texts = dict(zip(repo.prompts("tokens")["sample_id"], repo.prompts("tokens")["text"]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    # the rows of a prompt are its tokens, in order
    first = {int(s): int(np.flatnonzero(ids == s)[0]) for s in np.unique(ids)}

    def want(row: int) -> str:
        position = row - first[int(ids[row])]
        token = tokenizer(texts[int(ids[row])])["input_ids"][position]
        return f"token {position} {tokenizer.decode([token])!r}"

    rows = np.array([0, 1, len(ids) // 2, len(ids) - 1])
    assert layer.layerview.token_labels(repo, "tokens", LAYER, rows, ids[rows]) == [want(int(r)) for r in rows]
    assert layer.layerview.token_labels(repo, "pooled", LAYER, np.array([0]), np.array([0])) is None
    fig, _ = layer.draw_scatter(repo, "tokens", LAYER, "pca", 2, None)
    hover = [html.unescape(t) for trace in fig.data for t in (trace.hovertext or trace.text or [])]
    assert len(hover) == len(ids) and all(" · token " in t for t in hover)  # every row drawn, each with its token
    for row in rows:
        assert any(t.startswith(f"#{int(ids[row])} · {want(int(row))}: ") for t in hover)
    fig, _ = layer.draw_scatter(repo, "pooled", LAYER, "pca", 2, None)
    assert not any(" · token " in t for trace in fig.data for t in (trace.hovertext or trace.text or []))

    from dashboards.app import create_app

    app = create_app(root, workers=1, prefetch=False)
    try:
        client = app.server.test_client()
        for run_id, row, shown in (("tokens", int(rows[2]), f" · {want(int(rows[2]))}"), ("pooled", 3, None)):
            response = _post(client, ["point-details.children"],
                             [click(row)],
                             [{"id": "layer-key", "property": "data", "value": {"run": run_id, "layer": LAYER}}])
            text = response.get_data(as_text=True)
            assert response.status_code == 200 and f" · row {row}" in text
            assert (shown in text) if shown else "point-token" not in text
    finally:
        app.neuronmap.jobs.shutdown()
