"""The small-sample warning of `mutual-info` against the bias measured with sklearn on shuffled labels.

With 300 rows in 32 bins x 10 classes the plug-in MI of a neuron is mostly estimator bias: shuffled
labels (which carry no information) score nearly as much as the real ones. The warning must say so and
give the first-order bias (bins-1)(classes-1)/(2 n ln 2), and stay quiet when there are plenty of rows.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from analysistest_util import write_synthetic_run
from sklearn.metrics import mutual_info_score

from neuronmap.analysis import information as I
from neuronmap.analysis.runner import analyze


def _layer(n: int, classes: int, d: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array([f"c{i}" for i in rng.integers(0, classes, n)])
    codes = np.unique(labels, return_inverse=True)[1]
    x = rng.standard_normal((n, d))
    x[:, 0] += 0.5 * codes  # one informative neuron, the rest noise
    return x, labels


def _shuffled_mi_bits(x, labels, bins, seed=1):
    """Mean plug-in MI (bits) of each neuron with shuffled labels: sklearn on np.histogram bins."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(5):
        shuffled = rng.permutation(labels)
        out.append([mutual_info_score(shuffled, np.digitize(x[:, j], np.histogram_bin_edges(x[:, j], bins)[1:-1]))
                    / np.log(2) for j in range(x.shape[1])])
    return float(np.mean(out))


def test_warns_in_the_small_sample_regime_with_the_bias_estimate():
    n, bins, classes = 300, 32, 10
    x, labels = _layer(n, classes)
    with pytest.warns(RuntimeWarning, match="biased upwards") as caught:
        mi = I.mutual_information(x, labels, bins=bins)
    message = next(str(w.message) for w in caught if "biased upwards" in str(w.message))
    bias = (bins - 1) * (classes - 1) / (2 * n * np.log(2))
    stated = float(re.search(r"about ([0-9.]+) bits", message).group(1))
    assert stated == pytest.approx(bias, rel=1e-2)
    assert "miller-madow" in message and "fewer bins" in message
    # the stated bias is what uninformative (shuffled) labels score, and most of what the noise neurons score
    null = _shuffled_mi_bits(x, labels, bins)
    assert null == pytest.approx(bias, rel=0.25)
    assert mi[1:].mean() > 0.6 * bias


def test_quiet_with_plenty_of_rows():
    n, bins, classes = 2000, 8, 3  # 2000 >= 10 x 8 x 3
    x, labels = _layer(n, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mi = I.mutual_information(x, labels, bins=bins)
    ref = [mutual_info_score(labels, np.digitize(x[:, j], np.histogram_bin_edges(x[:, j], bins)[1:-1])) / np.log(2)
           for j in range(x.shape[1])]
    np.testing.assert_allclose(mi, ref, rtol=1e-10, atol=1e-14)
    # just below the threshold it warns
    with pytest.warns(RuntimeWarning, match="fewer than 10 x bins x classes = 240 rows"):
        I.mutual_information(x[:239], labels[:239], bins=bins)


def test_the_analysis_artifact_carries_the_warning(tmp_path):
    x, labels = _layer(300, 10)
    run = write_synthetic_run(tmp_path / "run", {"blocks.0": x.astype(np.float32)}, labels={"topic": labels.tolist()})
    art = analyze(run, "mutual-info", layers="blocks.0", labels="topic", params={"bins": 32})
    assert any("biased upwards by about 0.671 bits" in w for w in art.warnings)
    quiet = analyze(run, "mutual-info", layers="blocks.0", labels="topic", params={"bins": 2})
    assert not any("biased upwards" in w for w in quiet.warnings)
