"""A whole experiment end to end: runs, artifacts and report; re-running does no work; a crash resumes.

References: the run's rows against plain transformers (`output_hidden_states`, mean over real tokens),
the PCA artifact against scikit-learn, the generated prompts against `generate_prompts` itself.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

import neuronmap
from neuronmap.errors import ConfigError
from neuronmap.experiments import load_experiment, run_experiment

TINY = """
name: tiny
seed: 0
prompts: {{file: builtin:questions, limit: 40}}
model: {model}
layers: "blocks.*"
batch_size: 8
max_length: 64
samples_per_shard: {per_shard}
analyses:
  - name: stats
  - name: pca
    labels: topic
    params: {{n_components: 4}}
outputs:
  dir: {out}
"""


def experiment_file(write_experiment, tmp_path, model, name="experiment.yaml", per_shard=10, out="out", extra=""):
    return write_experiment(TINY.format(model=model, per_shard=per_shard, out=tmp_path / out) + extra, name)


def files_with_mtimes(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def statuses(result, step):
    return [item.status for item in result.of(step)]


def test_full_tiny_experiment_end_to_end_then_nothing_to_do(write_experiment, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = experiment_file(write_experiment, tmp_path, "tiny:gpt2")
    result = run_experiment(load_experiment(path))
    assert not result.failed, [s.line() for s in result.failed]
    assert statuses(result, "extract") == ["done"] and statuses(result, "analyze") == ["done", "done"]
    assert statuses(result, "report") == ["done"]
    out = tmp_path / "out"
    run = neuronmap.open_run(out / "tiny-gpt2")
    assert run.status == "complete" and run.manifest.n_samples == 40
    assert len({shard.index for shard in run.manifest.shards}) == 4
    from neuronmap.prompts import DEFAULT_PROMPTS

    shipped = pd.read_csv(DEFAULT_PROMPTS).head(40)
    assert run.prompts["text"].tolist() == shipped["text"].tolist()

    # the rows equal plain transformers: hidden_states[i + 1] averaged over each prompt's tokens (the last
    # block is left out: GPT-2's hidden_states[-1] is after the final norm, which `final` is)
    model_dir = out / "models" / "tiny-gpt2"
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    import torch

    with torch.no_grad():
        for row, text in enumerate(shipped["text"].tolist()[:6]):
            states = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
            for block in range(len(run.layers) - 1):
                np.testing.assert_allclose(run.array(f"blocks.{block}")[row], states[block + 1][0].mean(0).numpy(),
                                           rtol=1e-4, atol=1e-5)

    # the PCA artifact equals scikit-learn's PCA on the stored rows
    from sklearn.decomposition import PCA

    from neuronmap.analysis.artifacts import list_artifacts

    artifacts = {a.analysis: a for a in list_artifacts(run.path)}
    assert set(artifacts) == {"stats", "pca"}
    for layer in run.layers:
        reference = PCA(n_components=4).fit(run.array(layer))
        np.testing.assert_allclose(artifacts["pca"].array("explained_variance_ratio", layer),
                                   reference.explained_variance_ratio_, rtol=1e-4)
        np.testing.assert_allclose(artifacts["stats"].array("mean", layer), run.array(layer).mean(0), rtol=1e-4,
                                   atol=1e-6)

    # one report page for the experiment with every artifact; the configuration as run, with versions
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("plotly.js v") == 1 and "NeuronMap experiment · tiny" in page
    for artifact in artifacts.values():
        assert f'id="{artifact.id}"' in page
    resolved = yaml.safe_load((out / "experiment.resolved.yaml").read_text())
    import torch as torch_module
    import transformers

    assert resolved["seed"] == 0 and resolved["profile"] is None
    assert resolved["versions"]["torch"] == torch_module.__version__
    assert resolved["versions"]["transformers"] == transformers.__version__
    assert resolved["config"]["analyses"][1]["params"] == {"n_components": 4, "seed": 0}  # seed filled in
    record = json.loads((run.path / "experiment.json").read_text())
    assert record["fingerprint"]["layers"] == "blocks.*" and record["versions"] == resolved["versions"]

    # re-running does no work: every step skipped, no file under the experiment folder touched
    before = files_with_mtimes(out)
    again = run_experiment(load_experiment(path))
    assert {item.status for item in again.steps} == {"skipped"}
    assert [item.step for item in again.steps] == ["extract", "analyze", "analyze", "report"]
    assert files_with_mtimes(out) == before

    # the page shows this experiment's artifacts; others computed in the run by hand are only counted
    from neuronmap.analysis import analyze

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "2 components explain x%": not what this test is about
        other = analyze(run.path, "pca", params={"n_components": 2})
    (out / "experiment.state.json").unlink()
    assert statuses(run_experiment(load_experiment(path)), "report") == ["done"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f'id="{other.id}"' not in page and "1 other artifact of this run not shown" in page
    assert all(f'id="{artifact.id}"' in page for artifact in artifacts.values())


def test_interrupted_extraction_resumes_and_equals_an_uninterrupted_run(write_experiment, tmp_path, gpt2_dir,
                                                                         monkeypatch):
    import neuronmap.extraction as extraction

    real = extraction.commit_shard
    calls = {"n": 0}

    def crash_on_second_shard(writer, index, *args, **kwargs):
        if index == 1 and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("injected crash while committing shard 1")
        return real(writer, index, *args, **kwargs)

    path = experiment_file(write_experiment, tmp_path, gpt2_dir)
    monkeypatch.setattr(extraction, "commit_shard", crash_on_second_shard)
    first = run_experiment(load_experiment(path))
    (failed,) = first.failed
    assert failed.step == "extract" and "injected crash while committing shard 1" in failed.detail
    assert "kept 1 of 4 shards (10 of 40 samples)" in failed.detail and "re-run the same command to resume" in failed.detail
    assert statuses(first, "analyze") == ["skipped"] and "wait for the extraction" in first.of("analyze")[0].detail
    run_dir = tmp_path / "out" / "gpt2-seed0"
    assert neuronmap.open_run(run_dir).status == "failed"
    kept = {p: p.stat().st_mtime_ns for p in run_dir.glob("activations/*/part-00000.*")}
    assert len(kept) == 3  # blocks.0-2, shard 0

    monkeypatch.setattr(extraction, "commit_shard", real)
    second = run_experiment(load_experiment(path))
    assert not second.failed and statuses(second, "extract") == ["resumed"]
    assert statuses(second, "analyze") == ["done", "done"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # shard 0 was not extracted again

    clean = run_experiment(load_experiment(experiment_file(write_experiment, tmp_path, gpt2_dir, "clean.yaml",
                                                           out="clean")))
    assert not clean.failed
    resumed, reference = neuronmap.open_run(run_dir), neuronmap.open_run(tmp_path / "clean" / "gpt2-seed0")
    assert resumed.layers == reference.layers == ["blocks.0", "blocks.1", "blocks.2"]
    for layer in reference.layers:
        np.testing.assert_array_equal(resumed.array(layer), reference.array(layer))
        np.testing.assert_array_equal(resumed.sample_ids(layer), reference.sample_ids(layer))


def test_missing_dashboard_extra_skips_the_report_in_one_line(write_experiment, tmp_path, gpt2_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # `import plotly` raises ImportError, as without the extra
    monkeypatch.delitem(sys.modules, "dashboards.experiment_report", raising=False)
    path = experiment_file(write_experiment, tmp_path, gpt2_dir, per_shard=40)
    result = run_experiment(load_experiment(path))
    assert not result.failed and statuses(result, "analyze") == ["done", "done"]
    (report,) = result.of("report")
    assert report.status == "skipped" and "\n" not in report.detail
    assert "needs the dashboard extra (pip install -e '.[dashboard]')" in report.detail
    assert result.report is None and not (tmp_path / "out" / "report.html").exists()


def test_a_failing_analysis_is_reported_and_the_rest_completes(write_experiment, tmp_path, gpt2_dir):
    extra = "  - name: pca\n    params: {n_components: 500}\n  - name: cka\n"
    path = experiment_file(write_experiment, tmp_path, gpt2_dir, per_shard=40, extra="").read_text()
    path = write_experiment(path.replace("outputs:", extra + "outputs:"), "fail.yaml")
    result = run_experiment(load_experiment(path))
    (failed,) = result.failed
    assert failed.step == "analyze" and failed.target == "pca on gpt2-seed0" and failed.user_error
    assert "n_components=500" in failed.detail and "no artifact written for it" in failed.detail
    assert statuses(result, "analyze") == ["done", "done", "failed", "done"]
    assert statuses(result, "report") == ["done"]


def test_generated_prompts_and_no_resume(write_experiment, tmp_path, gpt2_dir):
    from neuronmap.questions import generate_prompts

    text = f"""
    name: gen
    seed: 3
    prompts:
      generate: {{source: sentiment, count: 30}}
    model: {gpt2_dir}
    layers: blocks.1
    analyses:
      - name: probe
        labels: sentiment
        params: {{n_splits: 3}}
    outputs: {{dir: {tmp_path / 'gen'}, report: false}}
    """.replace("\n    ", "\n")
    path = write_experiment(text, "gen.yaml")
    result = run_experiment(load_experiment(path))
    assert not result.failed and statuses(result, "generate") == ["done"]
    (written,) = (tmp_path / "gen" / "prompts").glob("sentiment-*.parquet")
    expected = generate_prompts("sentiment", 30, seed=3)  # the experiment's seed
    run = neuronmap.open_run(tmp_path / "gen" / "gpt2-seed0")
    assert run.prompts["text"].tolist() == expected["text"].tolist() == pd.read_parquet(written)["text"].tolist()
    assert run.prompts["sentiment"].tolist() == expected["sentiment"].tolist()
    assert statuses(run_experiment(load_experiment(path)), "generate") == ["skipped"]

    redo = run_experiment(load_experiment(path), resume=False)
    assert [(s.step, s.status) for s in redo.steps] == [("generate", "done"), ("extract", "done"), ("analyze", "done")]


def test_a_complete_run_of_another_configuration_is_refused(write_experiment, tmp_path, gpt2_dir, line_of):
    path = experiment_file(write_experiment, tmp_path, gpt2_dir, per_shard=40)
    assert not run_experiment(load_experiment(path)).failed
    changed = write_experiment(path.read_text().replace('layers: "blocks.*"', 'layers: "blocks.*"\npooling: last'),
                               "changed.yaml")
    with pytest.raises(ConfigError) as caught:
        run_experiment(load_experiment(changed))
    assert str(caught.value).startswith(f"{changed} line {line_of(changed, 'pooling: last')}: pooling: ")
    assert "holds a complete run of another configuration (differs in: pooling); run with --no-resume" in str(caught.value)
    redone = run_experiment(load_experiment(changed), resume=False)
    assert statuses(redone, "extract") == ["done"] and neuronmap.open_run(redone.runs["gpt2-seed0"]).manifest.pooling == "last"


@pytest.mark.parametrize("model, change, key, words", [
    ("tiny:gpt2", ('layers: "blocks.*"', 'layers: "blocks.99"'), 'layers: "blocks.99"', "unknown layer 'blocks.99'"),
    ("gpt2", ('layers: "blocks.*"', 'layers: "blocks.99"'), 'layers: "blocks.99"', "unknown layer 'blocks.99'"),
    ("gpt2", ("  - name: stats", "  - name: stats\n    layers: blocks.7"), "layers: blocks.7",
     "layer 'blocks.7' is not in the layers run gpt2-seed0 extracts; it holds: blocks.{0-2}"),
    ("no-such-model-xyz", None, "model: no-such-model-xyz", "unknown model 'no-such-model-xyz'"),
])
def test_unknown_models_and_layers_are_refused_before_anything_is_written(write_experiment, tmp_path, gpt2_dir,
                                                                          line_of, model, change, key, words):
    """They were found only by the extraction (after the resolved file, the state and a tiny model were
    written; an analysis' layer after the whole extraction), and a report of the failure was written."""
    path = experiment_file(write_experiment, tmp_path, gpt2_dir if model == "gpt2" else model)
    if change is not None:
        path.write_text(path.read_text().replace(*change))
    for dry_run in (True, False):
        with pytest.raises(ConfigError) as caught:
            run_experiment(load_experiment(path), dry_run=dry_run)
        assert str(caught.value).startswith(f"{path} line {line_of(path, key)}: "), str(caught.value)
        assert words in str(caught.value) and "neuronmap models layers tiny:" not in str(caught.value)
        assert not (tmp_path / "out").exists()


def test_a_generate_count_past_the_family_is_refused_at_its_key_dry_runs_too(write_experiment, tmp_path, line_of):
    """It was a failed step worded for the command line (`pass --count 8904`), and a dry run said nothing."""
    from neuronmap.questions import generate_prompts

    path = experiment_file(write_experiment, tmp_path, "tiny:gpt2")
    path.write_text(path.read_text().replace("prompts: {file: builtin:questions, limit: 40}",
                                             "prompts: {generate: {source: sentiment, count: 99999}}"))
    with pytest.raises(ConfigError) as reference:
        generate_prompts("sentiment", count=99999, seed=0)
    available = int(str(reference.value).split("has only ")[1].split()[0])
    for dry_run in (True, False):
        with pytest.raises(ConfigError) as caught:
            run_experiment(load_experiment(path), dry_run=dry_run)
        assert str(caught.value) == (f"{path} line {line_of(path, 'count: 99999')}: prompts.generate.count: template "
                                     f"family 'sentiment' has only {available} distinct prompts (asked for 99999): "
                                     f"set count to {available} or less")
        assert not (tmp_path / "out").exists()


def test_a_missing_text_column_is_named_at_its_key_in_the_files_words(write_experiment, tmp_path, line_of):
    path = experiment_file(write_experiment, tmp_path, "tiny:gpt2")
    path.write_text(path.read_text().replace("{file: builtin:questions, limit: 40}",
                                             "{file: builtin:questions, text_column: nope}"))
    with pytest.raises(ConfigError) as caught:
        run_experiment(load_experiment(path))
    message = str(caught.value)
    assert message.startswith(f"{path} line {line_of(path, 'text_column: nope')}: prompts.text_column: ")
    assert "has no column 'nope'" in message and "with text_column" in message and "--text-column" not in message
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(write_experiment, tmp_path):
    path = experiment_file(write_experiment, tmp_path, "tiny:gpt2")
    result = run_experiment(load_experiment(path), dry_run=True)
    assert {item.status for item in result.steps} == {"planned"} and len(result.steps) == 4
    assert not (tmp_path / "out").exists()
