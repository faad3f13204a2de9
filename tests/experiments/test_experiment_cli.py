"""`neuronmap run`: status lines, where the report is, the dashboard command, exit codes, profiles."""

from __future__ import annotations

import pytest
import yaml

from neuronmap.cli import main


@pytest.fixture()
def experiment(write_experiment, tmp_path, gpt2_dir):
    return write_experiment(f"""
    name: cli
    prompts: {{file: builtin:questions, limit: 24}}
    model: {gpt2_dir}
    layers: blocks.0,blocks.1
    batch_size: 8
    analyses:
      - name: stats
      - name: cka
    outputs: {{dir: {tmp_path / 'base'}}}
    profiles:
      test:
        outputs: {{dir: {tmp_path / 'profiled'}}}
        prompts: {{file: builtin:questions, limit: 12}}
    """.replace("\n    ", "\n"))


def test_run_prints_steps_report_and_dashboard_command(experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one status line per step, unwrapped
    assert main(["run", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "✓ extract gpt2-seed0: done: 24 samples, 2 layers, 1 shard" in out
    assert "✓ analyze stats on gpt2-seed0: done" in out and "✓ analyze cka on gpt2-seed0: done" in out
    assert f"report: {tmp_path / 'base' / 'report.html'}" in out
    assert f"dashboard: neuronmap dashboard --runs-dir {tmp_path / 'base'}" in out
    assert (tmp_path / "base" / "report.html").is_file()

    assert main(["run", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "steps: 4 skipped" in out and "↷ extract gpt2-seed0: skipped: complete run reused" in out


def test_profile_from_the_environment_and_from_the_option(experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEURONMAP_PROFILE", "test")
    assert main(["run", str(experiment), "--dry-run"]) == 0
    assert "profile test" in capsys.readouterr().out and not (tmp_path / "profiled").exists()
    assert main(["run", str(experiment)]) == 0
    resolved = yaml.safe_load((tmp_path / "profiled" / "experiment.resolved.yaml").read_text())
    assert resolved["profile"] == "test" and resolved["config"]["prompts"]["limit"] == 12
    assert not (tmp_path / "base").exists()
    assert main(["run", str(experiment), "--profile", "nope"]) == 2
    assert "profile 'nope' (from --profile) is not defined; profiles: test" in capsys.readouterr().err


def test_failed_step_exit_code(write_experiment, tmp_path, gpt2_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    path = write_experiment(f"""
    name: failing
    prompts: {{file: builtin:questions, limit: 12}}
    model: {gpt2_dir}
    layers: blocks.0
    analyses:
      - name: pca
        params: {{n_components: 100}}
      - name: stats
    outputs: {{dir: {tmp_path / 'failing'}, report: false}}
    """.replace("\n    ", "\n"))
    assert main(["run", str(path)]) == 2  # the only failure is a user mistake (a parameter out of range)
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("✗")]
    assert len(failed) == 1 and "analyze pca on gpt2-seed0: failed: n_components=100" in failed[0]
    assert "✓ analyze stats on gpt2-seed0: done" in out and "1 step(s) failed" in out


def test_output_dir_inside_a_regular_file_is_one_line(write_experiment, tmp_path, gpt2_dir, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "afile").write_text("x")
    path = write_experiment(f"""
    name: blocked
    prompts: {{file: builtin:questions, limit: 12}}
    model: {gpt2_dir}
    layers: blocks.0
    analyses:
      - name: stats
    outputs: {{dir: {tmp_path / 'bad' / 'afile' / 'out'}}}
    """.replace("\n    ", "\n"))
    for dry_run in ([], ["--dry-run"]):  # a dry run said nothing of it and exited 0
        assert main(["run", str(path), *dry_run]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {path} line "), lines
        assert f"outputs.dir: {tmp_path / 'bad' / 'afile' / 'out'} is under {tmp_path / 'bad' / 'afile'}, which is a " \
               "file: give a folder" in lines[0]
        assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["afile"]
    assert (tmp_path / "bad" / "afile").read_text() == "x"
