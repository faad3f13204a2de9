"""Connecting and resource checks: bad addresses and impossible requests fail in seconds, in one line."""

import socket
import time

import pytest
from actorstest_util import PROMPTS

from actors.cluster import Address, check_resources, parse_address, probe
from neuronmap.cli import main
from neuronmap.errors import ConfigError


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("text,expected", [
    ("auto", Address("auto", "auto")),
    ("10.0.0.5:6379", Address("gcs", "10.0.0.5:6379", "10.0.0.5", 6379)),
    ("ray://head.example:10001", Address("client", "ray://head.example:10001", "head.example", 10001)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "localhost", "http://head:8265", "head:port"])
def test_parse_address_rejects_other_forms_naming_the_valid_ones(text):
    with pytest.raises(ConfigError, match="auto, HOST:PORT"):
        parse_address(text)


def test_unreachable_address_is_a_config_error_within_seconds():
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no Ray cluster reachable at 127.0.0.1"):
        probe(parse_address(f"127.0.0.1:{closed_port()}"))
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("address", ["auto", None])
def test_auto_and_no_address_follow_ray_address_and_probe_it(address, monkeypatch):
    """Inside a Ray job RAY_ADDRESS names the cluster: no embedded cluster is started then."""
    from actors.cluster import ray_session

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    with pytest.raises(ConfigError, match="no Ray cluster reachable"):
        with ray_session(address):
            pass


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_red_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def test_cli_unreachable_address_exits_2_with_one_line(capsys, gpt2_dir, prompts_file, tmp_path):
    started = time.monotonic()
    code, _, err = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts_file, "-o", tmp_path / "run",
                           "--engine", "ray", "--address", f"127.0.0.1:{closed_port()}")
    assert code == 2 and "no Ray cluster reachable" in one_red_line(err)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,words", [
    (["--gpus-per-worker", "1"], "has none"),
    (["--workers", "9"], "do not fit"),
    (["--cpus-per-worker", "64"], "more than any node"),
])
def test_cli_impossible_resources_exit_2_before_scheduling(flags, words, ray_cluster, capsys, gpt2_dir, prompts_file,
                                                           tmp_path):
    started = time.monotonic()
    code, _, err = run_cli(capsys, "extract", "-m", gpt2_dir, "-p", prompts_file, "-o", tmp_path / "run",
                           "--engine", "ray", *flags)
    assert code == 2 and words in one_red_line(err)
    assert time.monotonic() - started < 10  # no pending actor waited on
    assert not (tmp_path / "run").exists()


def test_capacity_counts_workers_that_fit_beside_the_tokenising_tasks(ray_cluster):
    capacity = check_resources(None, 1.0, 0.0)  # the session cluster has 4 logical CPUs
    assert capacity.cpus == 4 and capacity.gpus == 0 and capacity.max_workers == 3
    assert check_resources(6, 0.5, 0.0).max_workers == 7
