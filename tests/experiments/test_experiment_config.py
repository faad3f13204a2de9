"""Experiment files: validation errors name the file, the line and the key path; profiles; layer templates."""

from __future__ import annotations

import re

import pytest

from neuronmap.cli import main
from neuronmap.errors import ConfigError
from neuronmap.experiments import load_experiment, run_experiment
from neuronmap.experiments.plan import plan_runs

BASE = """
name: t
prompts: builtin:questions
model: tiny:gpt2
"""


def error_of(path, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load_experiment(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_analysis_names_its_key_line_and_close_names(write_experiment, line_of):
    path = write_experiment(BASE + """
    analyses:
      - name: stats
      - name: pcaa
    """.replace("\n    ", "\n"))
    message = error_of(path)
    assert message.startswith(f"{path} line {line_of(path, 'pcaa')}: analyses[1].name: unknown analysis 'pcaa'")
    assert "did you mean pca" in message


def test_bad_parameter_is_checked_by_the_analysis_own_model(write_experiment, line_of):
    path = write_experiment(BASE + """
    analyses:
      - name: stats
      - name: probe
        labels: topic
      - name: kmeans
        params:
          k_max: 8
          k_min: 1
    """.replace("\n    ", "\n"))
    assert error_of(path) == f"{path} line {line_of(path, 'k_min')}: analyses[2].params.k_min: must be >= 2 (got 1)"


def test_unknown_parameter_lists_the_valid_ones(write_experiment, line_of):
    path = write_experiment(BASE + "analyses:\n  - name: pca\n    params: {n_compnents: 3}\n")
    message = error_of(path)
    assert message.startswith(f"{path} line {line_of(path, 'n_compnents')}: analyses[0].params.n_compnents: unknown key")
    assert "did you mean 'n_components'" in message


def test_bad_pooling(write_experiment, line_of):
    path = write_experiment(BASE + "batch_size: 4\npooling: average\n")
    assert error_of(path) == (f"{path} line {line_of(path, 'pooling')}: pooling: 'average' is not a pooling; use one "
                              "of mean, last, first, max, none")


def test_pooling_names_match_the_extractor():
    from neuronmap.experiments.config import POOLINGS
    from neuronmap.pooling import POOLING_MODES

    assert tuple(POOLINGS) == tuple(POOLING_MODES)


def test_missing_model(write_experiment):
    path = write_experiment("name: t\nprompts: builtin:questions\n")
    assert error_of(path) == f"{path} line 1: model: is required"


def test_malformed_yaml_gives_the_line(write_experiment):
    path = write_experiment("name: t\nprompts: [a, b\nmodel: tiny:gpt2\nseed: 1\n")
    message = error_of(path)
    assert re.match(rf"{re.escape(str(path))} line 3: malformed YAML: .*\(column \d+\)$", message), message


def test_empty_file_duplicate_key_and_wrong_top_level(write_experiment, line_of):
    assert "is empty" in error_of(write_experiment("# nothing\n", "empty.yaml"))
    path = write_experiment(BASE + "seed: 1\nseed: 2\n", "dup.yaml")
    assert error_of(path) == (f"{path} line {line_of(path, 'seed: 2')}: seed: duplicate key (first written on line "
                              f"{line_of(path, 'seed: 1')}); keep one")
    assert "must be a mapping" in error_of(write_experiment("- a\n- b\n", "list.yaml"))


def test_wrong_types_and_nested_keys(write_experiment, line_of):
    path = write_experiment(BASE + "outputs:\n  dir: out\n  report: sometimes\n")
    assert error_of(path) == f"{path} line {line_of(path, 'report:')}: outputs.report: must be true or false " \
                             "(got 'sometimes')"
    path = write_experiment(BASE + "batch_size: many\n", "b.yaml")
    assert error_of(path) == f"{path} line 4: batch_size: must be an integer (got 'many')"
    path = write_experiment("name: t\nprompts: {file: a.csv, generate: {source: sentiment}}\nmodel: x\n", "p.yaml")
    assert "prompts: give exactly one of `file:`" in error_of(path)
    path = write_experiment("name: t\nprompts: {generate: {source: sentimnt}}\nmodel: x\n", "g.yaml")
    assert error_of(path).startswith(f"{path} line 2: prompts.generate.source: 'sentimnt' is not a template family")



def test_an_unknown_reporter_and_a_repeated_analysis_are_refused(write_experiment, line_of):
    """Both were accepted: the report the user asked for was skipped at the end, and the repeat did nothing."""
    path = write_experiment(BASE + "outputs:\n  reporter: nosuchreporter\n")
    assert error_of(path) == (f"{path} line {line_of(path, 'reporter:')}: outputs.reporter: 'nosuchreporter' is not an "
                              "installed reporter; use one of html")
    path = write_experiment(BASE + "analyses:\n  - name: stats\n  - name: pca\n  - name: stats\n", "d.yaml")
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if "name: stats" in line]
    assert error_of(path) == (f"{path} line {lines[1]}: analyses[2]: analysis 'stats' repeats analyses[0] (same "
                              "params, layers and labels); remove one, or change its params")
    path = write_experiment(BASE + "analyses:\n  - name: pca\n  - name: pca\n    params: {n_components: 3}\n", "e.yaml")
    assert len(load_experiment(path).config.analyses) == 2  # the same analysis with other params is two analyses

def test_labels_rules(write_experiment, line_of):
    path = write_experiment(BASE + "analyses:\n  - name: stats\n  - name: probe\n    layers: blocks.1\n")
    assert error_of(path) == (f"{path} line {line_of(path, 'name: probe')}: analyses[1]: analysis probe needs a label "
                              "column: add `labels: COLUMN` (a column of the prompts)")
    path = write_experiment(BASE + "analyses:\n  - name: stats\n    labels: topic\n", "s.yaml")
    assert "analyses[0].labels: analysis stats does not use labels" in error_of(path)
    # a column the prompts lack is found when the prompts are read (dry run: nothing written)
    path = write_experiment(BASE + "analyses:\n  - name: probe\n    labels: colour\n", "c.yaml")
    with pytest.raises(ConfigError) as caught:
        run_experiment(load_experiment(path), dry_run=True)
    assert str(caught.value).startswith(f"{path} line {line_of(path, 'colour')}: analyses[0].labels: 'colour' is not "
                                        "a column of the prompts; label columns: topic, question_type")


def test_run_names_must_differ(write_experiment, line_of):
    path = write_experiment("name: t\nprompts: builtin:questions\nmodel:\n  - tiny:gpt2\n  - source: tiny:gpt2\n")
    assert error_of(path) == (f"{path} line {line_of(path, 'source: tiny')}: model[1]: run name 'tiny-gpt2' is also "
                              "used by model[0]; give one of them `run: NAME`")


PROFILED = """
name: t
prompts: builtin:questions
model: tiny:gpt2
batch_size: 32
device: auto
outputs:
  dir: runs/base
  report: false
profiles:
  dev:
    batch_size: 4
    outputs: {dir: runs/dev}
  prod:
    device: cuda
    batch_size: 0
"""


def test_profiles_override_fields_and_merge_mappings(write_experiment):
    path = write_experiment(PROFILED)
    base = load_experiment(path, environ={})
    assert (base.profile, base.config.batch_size, base.config.outputs.dir) == (None, 32, "runs/base")
    dev = load_experiment(path, profile="dev", environ={})
    assert (dev.profile, dev.config.batch_size, dev.config.device) == ("dev", 4, "auto")
    assert (dev.config.outputs.dir, dev.config.outputs.report) == ("runs/dev", False)  # merged, not replaced
    from_env = load_experiment(path, environ={"NEURONMAP_PROFILE": "dev"})
    assert from_env.profile == "dev" and from_env.config.batch_size == 4
    # --profile wins over the environment variable
    with pytest.raises(ConfigError) as caught:
        load_experiment(path, profile="prod", environ={"NEURONMAP_PROFILE": "dev"})
    # a profile's bad value is reported where the profile writes it
    lines = path.read_text().splitlines()
    assert str(caught.value) == (f"{path} line {lines.index('    batch_size: 0') + 1}: profiles.prod.batch_size: must "
                                 "be >= 1 (got 0)")


def test_unknown_profile_names_its_source(write_experiment):
    path = write_experiment(PROFILED)
    assert error_of(path, profile="staging", environ={}) == (f"{path}: profile 'staging' (from --profile) is not "
                                                             "defined; profiles: dev, prod")
    assert "(from the NEURONMAP_PROFILE environment variable)" in error_of(path, environ={"NEURONMAP_PROFILE": "x"})
    bad = write_experiment(BASE + "profiles:\n  dev: 3\n", "bad.yaml")
    assert error_of(bad, profile="dev") == f"{bad} line 5: profiles.dev: must be a mapping of the keys this profile " \
                                           "overrides, e.g. {batch_size: 8, device: cpu}"


def test_layer_templates_per_model_family(write_experiment, line_of, gpt2_dir, tiny_model_dir):
    bert_dir = tiny_model_dir("bert")
    path = write_experiment(f"""
    name: t
    prompts: builtin:questions
    model: [{gpt2_dir}, {bert_dir}, all-minilm-l6-v2, tiny:llama]
    layers: {{gpt2: "blocks.0,final", bert: "blocks.*", default: "embed"}}
    analyses:
      - name: stats
        layers: {{gpt2: blocks.0, default: all}}
    """.replace("\n    ", "\n"))
    experiment = load_experiment(path)
    targets = plan_runs(experiment)
    assert [(t.family, t.layers) for t in targets] == [("gpt2", "blocks.0,final"), ("bert", "blocks.*"),
                                                       ("bert", "blocks.*"), ("llama", "embed")]
    from neuronmap.experiments.plan import analysis_layers

    assert [analysis_layers(experiment, t, 0) for t in targets] == ["blocks.0", "all", "all", "all"]
    strict = write_experiment(f"name: t\nprompts: builtin:questions\nmodel: [{gpt2_dir}, {bert_dir}]\n"
                              "layers:\n  gpt2: blocks.0\n", "strict.yaml")
    with pytest.raises(ConfigError) as caught:
        plan_runs(load_experiment(strict))
    assert str(caught.value).startswith(f"{strict} line {line_of(strict, 'layers:')}: layers: no layer spec for model "
                                        "family 'bert' (model[1]")


def test_unknown_tiny_family(write_experiment):
    path = write_experiment("name: t\nprompts: builtin:questions\nmodel: tiny:gpt5\n")
    with pytest.raises(ConfigError) as caught:
        plan_runs(load_experiment(path))
    assert str(caught.value).startswith(f"{path} line 3: model: tiny:gpt5 is not a tiny family; use tiny:gpt2")


def test_cli_config_error_is_one_line_and_exit_2(write_experiment, line_of, capsys):
    path = write_experiment(BASE + "analyses:\n  - name: kmeans\n    params: {k_min: 1}\n")
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == [f"error: {path} line {line_of(path, 'k_min')}: analyses[0].params.k_min: must be >= 2 (got 1)"]
    assert "Traceback" not in captured.out + captured.err
    assert main(["run", str(path.with_name("missing.yaml"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", str(write_experiment(BASE, "ok.yaml")), "--engine", "spark", "--dry-run"]) == 2
    assert "--engine 'spark' is not installed; use one of local" in capsys.readouterr().err


@pytest.mark.parametrize("profile", [None, "dev", "test", "prod"])
def test_the_shipped_demo_experiment_validates_and_plans(profile, tmp_path, monkeypatch):
    """`make demo` runs examples/demo.yaml: it must load under every profile and plan without writing."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    monkeypatch.chdir(tmp_path)  # outputs are relative to the working folder
    experiment = load_experiment(demo, profile=profile)
    assert experiment.config.engine == "ray" and experiment.config.ray.analyses is False
    assert {a.name for a in experiment.config.analyses} >= {"stats", "pca", "cka", "probe"}
    run_experiment(experiment, dry_run=True)
    assert list(tmp_path.iterdir()) == []
