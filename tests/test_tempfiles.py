"""Temporaries a killed writer left beside a result are removed by the next writer of that name."""

from __future__ import annotations

import os
import subprocess
import sys

from neuronmap.tempfiles import alive, remove_abandoned, temp_path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, living = _dead_pid(), os.getppid()
    assert not alive(dead) and alive(living) and alive(os.getpid())
    out = tmp_path / "report.html"
    (tmp_path / f".report.html.tmp-{dead}").write_bytes(b"partial")
    (tmp_path / f".report.html.tmp-{dead}.d").write_bytes(b"not ours")  # not a pid suffix
    (tmp_path / f".report.html.tmp-{living}").write_bytes(b"being written")
    (tmp_path / f".other.html.tmp-{dead}").write_bytes(b"another file's")
    folder = tmp_path / f".tiny-gpt2.tmp-{dead}"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights.bin").write_bytes(b"x")
    remove_abandoned(out)
    remove_abandoned(tmp_path / "tiny-gpt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".report.html.tmp-{dead}.d", f".report.html.tmp-{living}", f".other.html.tmp-{dead}"])
    assert temp_path(out).name == f".report.html.tmp-{os.getpid()}"


def test_writing_a_figure_removes_what_a_killed_writer_left(tmp_path):
    from dashboards.export import write_bytes

    dead = _dead_pid()
    (tmp_path / f".report.html.tmp-{dead}").write_bytes(b"partial")
    write_bytes(tmp_path / "report.html", b"<html></html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
