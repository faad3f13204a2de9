"""`neuronmap extract --engine ray --stages K` and `--out s3://...` through the CLI and `neuronmap.extract`.

The engine side is tested in test_pipeline_run.py, tests/store/test_remote.py and test_remote_engine.py;
these check that the command line and the Python API reach it, and that mistakes are one red line.
"""

import time

import pytest
from actorstest_util import PROMPTS, assert_same_run

import neuronmap
from neuronmap.cli import main
from neuronmap.errors import ConfigError
from neuronmap.store import open_run, remote


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def test_cli_stages_run_equals_local_run(ray_cluster, gpt2_dir, prompts_file, tmp_path, capsys, one_thread):
    options = ["-l", "embed,blocks.*,final", "--samples-per-shard", "5", "--batch-size", "3"]
    local = neuronmap.extract(gpt2_dir, prompts_file, out=tmp_path / "local", layers="embed,blocks.*,final",
                              samples_per_shard=5, batch_size=3)
    code, _, err = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts_file, "-o", tmp_path / "stages",
                           *options, "--engine", "ray", "--stages", "2", "--cpus-per-stage", "0.5", "-q")
    assert code == 0, err
    assert_same_run(open_run(tmp_path / "stages"), local)
    run = neuronmap.extract(gpt2_dir, prompts_file, out=tmp_path / "api", layers="embed,blocks.*,final",
                            samples_per_shard=5, batch_size=3, engine="ray", stages=2, cpus_per_stage=0.5)
    assert_same_run(run, local)


@pytest.mark.parametrize("flags,words", [
    (["--stages", "4"], "stages=4 must be between 1 and the model's number of blocks (3)"),
    (["--stages", "2", "--gpus-per-stage", "1"], "--gpus-per-stage 1 asks for GPUs but the Ray cluster has none"),
    (["--stages", "2", "--workers", "2"], "--workers size the data-parallel worker pool"),
])
def test_cli_stage_mistakes_exit_2_with_one_line(flags, words, ray_cluster, gpt2_dir, prompts_file, tmp_path, capsys):
    started = time.monotonic()
    code, _, err = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts_file, "-o", tmp_path / "run",
                           "--engine", "ray", *flags)
    assert code == 2 and words in one_line(err)
    assert time.monotonic() - started < 10 and not (tmp_path / "run").exists()


def test_local_engine_rejects_stage_options(gpt2_dir, tmp_path):
    with pytest.raises(ConfigError, match="stages, cpus_per_stage only apply to a distributed engine"):
        neuronmap.extract(gpt2_dir, PROMPTS, out=tmp_path / "r", stages=2, cpus_per_stage=1)


def test_cli_out_s3(s3_bucket, gpt2_dir, prompts_file, tmp_path, capsys):
    name, _client = s3_bucket
    url = f"s3://{name}/cli/run"
    code, out, err = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts_file, "-o", url, "-f", "parquet",
                             "-l", "blocks.0", "-q")
    assert code == 0, err
    assert url in out
    local = neuronmap.extract(gpt2_dir, prompts_file, out=tmp_path / "local", layers="blocks.0", format="parquet")
    assert_same_run(remote.open_remote_run(url), local)
    code, _, err = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts_file, "-o", f"s3://{name}/cli/h5")
    assert code == 2 and "HDF5 runs are local" in one_line(err)
