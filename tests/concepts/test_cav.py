"""Concept activation vectors against planted concepts, and the `cav` analysis's one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from concepttest_util import one_line_error, run_cli, write_run

from neuronmap.analysis.runner import analyze
from neuronmap.concepts.cav import cav_runs, cosine_matrix, fit_cav, label_text, split_by_label
from neuronmap.errors import ConfigError

D = 32


def _unit(rng, d=D):
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """1000 rows of N(0, I) in blocks.0; the rows labelled 'yes' shifted by 5 along a known unit direction u.

    blocks.1: three concepts a, b, c planted along directions with known cosines (a.b ~ 0, c between
    them), d plain noise.
    """
    rng = np.random.default_rng(0)
    u, w = _unit(rng), _unit(rng)
    n = 1000
    y = np.array(["yes" if i % 2 else "no" for i in range(n)])
    x = rng.standard_normal((n, D)).astype(np.float32)
    x[y == "yes"] += (5 * u).astype(np.float32)
    kind = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, n)]
    x2 = rng.standard_normal((n, D)).astype(np.float32)
    c_dir = (u + w) / np.linalg.norm(u + w)
    for name, direction in (("a", u), ("b", w), ("c", c_dir)):
        x2[kind == name] += (5 * direction).astype(np.float32)
    run = write_run(tmp_path_factory.mktemp("cav") / "run", {"blocks.0": x, "blocks.1": x2},
                    labels={"concept": y.tolist(), "kind": kind.tolist(), "one": ["same"] * n}, samples_per_shard=64)
    return {"run": run, "u": u, "w": w, "c": c_dir}


def test_planted_concept_is_found(planted):
    """Accuracy > 0.95 on held-out rows and the CAV points along the planted direction (cosine > 0.9)."""
    artifact = analyze(planted["run"], "cav", layers="blocks.0", labels="concept", params={"concept": "yes"})
    metrics = artifact.metrics("blocks.0")
    assert metrics["accuracy:yes"] > 0.95
    cav = artifact.array("cavs", "blocks.0")[0]
    assert np.linalg.norm(cav) == pytest.approx(1.0)
    assert cav @ planted["u"] > 0.9
    # random-vs-random CAVs of the same rows are at chance
    assert abs(metrics["random_accuracy:yes"] - 0.5) < 0.15
    # the negative side gives the opposite direction
    flipped = analyze(planted["run"], "cav", layers="blocks.0", labels="concept", params={"concept": "no"})
    assert flipped.array("cavs", "blocks.0")[0] @ planted["u"] < -0.9


def test_svm_classifier_and_fit_cav_directly():
    rng = np.random.default_rng(1)
    u = _unit(rng)
    concept = rng.standard_normal((150, D)) + 5 * u
    random = rng.standard_normal((150, D))
    for classifier, C in (("logistic", 0.1), ("svm", 0.01)):  # LinearSVC's squared hinge needs a smaller C
        cav = fit_cav(concept, random, classifier=classifier, C=C, seed=0)
        assert cav.accuracy > 0.95 and cav.vector @ u > 0.9
        # the intercept and raw weights give the classifier's decision: concept rows mostly on the positive side
        decision = concept @ (cav.vector * cav.raw_norm) + cav.intercept
        assert (decision > 0).mean() > 0.95


def test_similarity_between_concepts(planted):
    """Cosine between the CAVs of a, b, c follows the cosines of their planted directions."""
    artifact = analyze(planted["run"], "cav", layers="blocks.1", labels="kind",
                       params={"concept": ["a", "b", "c"], "negative": "d"})
    cavs = artifact.array("cavs", "blocks.1")
    cosine = artifact.array("cosine", "blocks.1")
    np.testing.assert_allclose(cosine, cosine_matrix(cavs), atol=1e-12)
    truth = cosine_matrix(np.stack([planted["u"], planted["w"], planted["c"]]))
    np.testing.assert_allclose(cosine, truth, atol=0.12)
    metrics = artifact.metrics("blocks.1")
    assert metrics["cosine:a|c"] == pytest.approx(cosine[0, 2])
    assert all(metrics[f"accuracy:{c}"] > 0.95 for c in "abc")
    table = artifact.table("cav")
    assert list(table["concept"]) == ["a", "b", "c"] and set(table["layer"]) == {"blocks.1"}


def test_cav_runs_are_seeded_and_balanced():
    rng = np.random.default_rng(2)
    concept, random = rng.standard_normal((30, 8)) + 2, rng.standard_normal((200, 8))
    first = cav_runs(concept, random, n_runs=3, null_sets=2, seed=4)
    again = cav_runs(concept, random, n_runs=3, null_sets=2, seed=4)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    np.testing.assert_array_equal(first.null_vectors, again.null_vectors)
    assert first.size == 30 and first.set_size == 30 and first.null_vectors.shape == (2, 3, 8)
    assert all(c.n_concept == 30 and c.n_random == 30 for c in first.concept)


def test_split_by_label_errors():
    labels = np.array(["a", "a", "b"])
    with pytest.raises(ConfigError, match="single value"):
        split_by_label(np.array(["a", "a"]), "a")
    with pytest.raises(ConfigError, match="'z' is not a value"):
        split_by_label(labels, "z")
    with pytest.raises(ConfigError, match="both 'a'"):
        split_by_label(labels, "a", "a")
    c, r = split_by_label(np.array([1, 2, 1]), 1)  # numbers compare as text
    assert c.tolist() == [0, 2] and r.tolist() == [1]


def test_cli_errors_are_one_line(planted, capsys):
    run = planted["run"]
    cases = [
        (["--labels", "one", "--param", "concept=same"], "single value"),
        (["--labels", "concept", "--param", "concept=maybe"], "'maybe' is not a value"),
        (["--labels", "concept", "--param", "concept=yes", "--layers", "blocks.9"], "blocks.9"),
        (["--labels", "concept"], "concept=VALUE"),
        (["--labels", "nope", "--param", "concept=yes"], "nope"),
    ]
    for extra, expected in cases:
        code, _, err = run_cli(capsys, "analyze", run, "cav", *extra)
        assert code == 2, (extra, err)
        assert expected in one_line_error(err)


def test_cav_cli_and_figure(planted, capsys):
    from neuronmap.analysis.artifacts import list_artifacts
    from neuronmap.viz import figure_for_artifact

    code, out, err = run_cli(capsys, "analyze", planted["run"], "cav", "--labels", "kind", "--param", "concept=a,b",
                             "--layers", "blocks.*", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["units"]) == {"blocks.0", "blocks.1"}
    assert result["units"]["blocks.1"]["metrics"]["accuracy:a"] > 0.95
    artifact = next(a for a in list_artifacts(planted["run"]) if a.id == result["id"])
    figure = figure_for_artifact(artifact)
    names = [trace.name for trace in figure.data]
    assert "a" in names and "b" in names
    assert any(trace.type == "heatmap" for trace in figure.data)


def test_max_examples_must_be_at_least_two():
    rng = np.random.default_rng(0)
    concept, random = rng.standard_normal((20, 4)), rng.standard_normal((40, 4))
    for bad in (0, 1, -4, True):
        with pytest.raises(ConfigError, match=r"max_examples=.* must be an integer >= 2"):
            cav_runs(concept, random, n_runs=2, max_examples=bad)
    assert cav_runs(concept, random, n_runs=2, max_examples=2).size == 2


def test_boolean_label_values_match_true_false_in_any_case(tmp_path, capsys):
    rng = np.random.default_rng(0)
    flag = np.arange(40) % 2 == 0
    x = rng.standard_normal((40, 6)).astype(np.float32) + flag[:, None] * 3.0
    run = write_run(tmp_path / "run", {"blocks.0": x}, labels={"is_question": flag.tolist()})
    c, r = split_by_label(flag, "true")
    assert c.tolist() == np.flatnonzero(flag).tolist() and r.tolist() == np.flatnonzero(~flag).tolist()
    assert label_text(flag, "FALSE") == "False" and label_text(flag, True) == "True"
    results = []
    for typed in ("true", "True", "TRUE"):
        code, out, err = run_cli(capsys, "analyze", run, "cav", "--labels", "is_question", "--param",
                                 f"concept={typed}", "--json")
        assert code == 0, err
        results.append(json.loads(out)["units"]["blocks.0"]["metrics"])
    assert all(m["concepts"] == ["True"] and m["accuracy:True"] == results[0]["accuracy:True"] for m in results)
    code, _, err = run_cli(capsys, "analyze", run, "cav", "--labels", "is_question", "--param", "concept=maybe")
    assert code == 2 and "'maybe' is not a value of label column 'is_question'; its values: False, True" in \
        one_line_error(err)
