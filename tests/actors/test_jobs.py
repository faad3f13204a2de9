"""`neuronmap submit` / `jobs` end to end against a real `ray start --head` on 127.0.0.1.

The head runs in its own process group and temp dir, so stopping it never touches another Ray
instance on the machine (such as the test session's local cluster).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuronmap.cli import main
from neuronmap.store import open_run

VENV_BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    from actors.jobs import enable_token_auth_if_available

    enable_token_auth_if_available()  # the head enables token auth by itself when a token exists
    temp = tmp_path_factory.mktemp("rayhead")
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats",
         # The agents' default ports (52365, ...) are taken when another Ray runs on the machine (the
         # test session's own cluster): a head whose job agent cannot bind accepts no job.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or head.poll() is not None:
                head.kill()
                pytest.fail("ray head did not start within 90 s")
            time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGINT)
    try:
        head.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_runs_extraction_on_the_cluster(ray_head, tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\nanother prompt here\n")
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "submit", "--address", ray_head, "--json", "--", "extract", "-m",
                            tiny_model_dir("gpt2"), "-p", prompts, "-l", "blocks.0", "-o", out, "-q")
    assert code == 0, err
    job_id = json.loads(stdout)["id"]
    from actors import jobs

    final = jobs.wait(job_id, address=ray_head, timeout=180)
    assert final["status"] == "SUCCEEDED", jobs.logs(job_id, ray_head)
    assert open_run(out).manifest.status == "complete"

    code, stdout, _ = cli(capsys, "jobs", "list", "--address", ray_head, "--json")
    assert code == 0 and job_id in {row["id"] for row in json.loads(stdout)}
    code, stdout, _ = cli(capsys, "jobs", "status", job_id, "--address", ray_head, "--json")
    assert json.loads(stdout)["status"] == "SUCCEEDED"
    code, stdout, _ = cli(capsys, "jobs", "logs", job_id, "--address", ray_head)
    assert code == 0 and "complete" in stdout


def test_stop_a_running_job(ray_head, tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt number {i} with some words in it\n" for i in range(20000)))
    code, stdout, _ = cli(capsys, "submit", "--address", ray_head, "--json", "--", "extract", "-m",
                          tiny_model_dir("gpt2"), "-p", prompts, "-o", tmp_path / "big", "-q", "--batch-size", "1")
    job_id = json.loads(stdout)["id"]
    code, _, _ = cli(capsys, "jobs", "stop", job_id, "--address", ray_head)
    assert code == 0
    from actors import jobs

    assert jobs.wait(job_id, address=ray_head, timeout=60)["status"] == "STOPPED"


def test_unknown_job_and_unreachable_address_are_one_line_errors(ray_head, capsys):
    code, _, err = cli(capsys, "jobs", "status", "raysubmit_nope", "--address", ray_head)
    assert code == 2 and "jobs list" in err
    started = time.monotonic()
    code, _, err = cli(capsys, "jobs", "list", "--address", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "no Ray job server" in err and time.monotonic() - started < 10
    code, _, err = cli(capsys, "submit", "--address", ray_head)
    assert code == 2 and "nothing to submit" in err
