"""Fixtures of the intervention tests: the hand-built induction model (see handbuilt_induction.py)."""

from __future__ import annotations

import pytest
from handbuilt_induction import build_induction_model


@pytest.fixture(scope="session")
def induction_dir(tmp_path_factory):
    return build_induction_model(tmp_path_factory.mktemp("induction") / "model")


@pytest.fixture
def induction(induction_dir):
    """The hand-built model, freshly loaded (head=True, CPU)."""
    from neuronmap.models.loading import load_model

    return load_model(induction_dir, head=True, device="cpu")
