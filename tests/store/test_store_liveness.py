"""A run's writing lock tells an extraction in progress from one that was killed (`store.liveness`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuronmap.cli import main
from neuronmap.store import RunWriter, load_manifest
from neuronmap.store.liveness import WRITING_NAME, writer_alive
from storetest_util import make_manifest, write_run

HERE = Path(__file__).resolve().parent
CHILD = """
import sys, time
import pandas as pd
sys.path.insert(0, {here!r})
from neuronmap.store import RunWriter
from storetest_util import make_manifest
writer = RunWriter({run!r}, make_manifest())
writer.write_prompts(pd.DataFrame({{"sample_id": range(7), "text": [f"prompt {{i}}" for i in range(7)]}}))
print("writing", flush=True)
time.sleep(120)
"""


def start_writer(run: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(here=str(HERE), run=str(run))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    return child


def show(capsys, run: Path) -> str:
    assert main(["runs", "show", str(run)]) == 0
    return capsys.readouterr().out


def test_a_writer_holds_the_lock_until_it_completes_or_fails(tmp_path):
    writer = RunWriter(tmp_path / "a", make_manifest())
    assert writer_alive(tmp_path / "a") is True
    writer.fail("stopped on purpose")
    assert writer_alive(tmp_path / "a") is False
    reopened = RunWriter(tmp_path / "a", make_manifest())  # resuming takes it again
    attached = RunWriter.attach(tmp_path / "a")  # a second process of the same run (a Ray worker)
    assert writer_alive(tmp_path / "a") is True
    reopened.close()
    assert writer_alive(tmp_path / "a") is True  # the attached writer still holds it
    attached.close()
    assert writer_alive(tmp_path / "a") is False
    written = write_run(tmp_path / "b")  # completed through `complete`
    assert load_manifest(tmp_path / "b").status == "complete" and writer_alive(tmp_path / "b") is False
    assert written is not None


def test_a_killed_writer_leaves_a_run_that_says_it_was_interrupted(tmp_path, capsys):
    run = tmp_path / "run"
    child = start_writer(run)
    try:
        assert load_manifest(run).status == "running"
        assert writer_alive(run) is True
        assert "being extracted now" in show(capsys, run)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert load_manifest(run).status == "running"  # the manifest cannot know: the lock does
    assert writer_alive(run) is False
    out = show(capsys, run)
    assert "was interrupted (no process is writing it)" in " ".join(out.split())
    assert main(["runs", "show", str(run), "--json"]) == 0
    assert '"writer_alive": false' in capsys.readouterr().out


def test_a_run_without_the_lock_file_is_unknown(tmp_path, capsys):
    run = tmp_path / "old"
    write_run(run, complete=False, n_shards_to_write=1)
    assert writer_alive(run) is False  # the writer object is gone: nothing holds the lock
    (run / WRITING_NAME).unlink()  # as a run written before the lock existed
    assert writer_alive(run) is None
    assert "this run is incomplete: re-run" in " ".join(show(capsys, run).split())
