"""Helpers of the experiment tests: write an experiment YAML, and find the line a key is written on."""

from __future__ import annotations

import textwrap

import pytest


@pytest.fixture()
def write_experiment(tmp_path):
    """``write_experiment(text, name="experiment.yaml") -> Path``: dedented YAML written under tmp_path."""

    def write(text: str, name: str = "experiment.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture()
def line_of():
    """``line_of(path, needle) -> int``: 1-based line of the first line containing `needle`.

    Found by plain text search: the independent reference for the line numbers in error messages.
    """

    def find(path, needle: str) -> int:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if needle in line:
                return number
        raise AssertionError(f"{needle!r} not in {path}")

    return find


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_dir):
    return str(tiny_model_dir("gpt2"))
