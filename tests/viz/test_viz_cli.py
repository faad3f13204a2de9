"""`neuronmap visualize` and `neuronmap report` on a real (synthetic) run with real artifacts."""

from __future__ import annotations

import os
import re
import shutil

import pytest

pytest.importorskip("plotly", reason="plotly is part of the dashboard extra (pip install -e '.[dashboard]')")

from neuronmap.analysis import analyze  # noqa: E402
from neuronmap.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
HAS_BROWSER = bool(os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("google-chrome"))


@pytest.fixture(scope="module")
def analysed(run_path):
    ids = {name: analyze(run_path, name, layers=layers, labels=labels, params=params).id
           for name, layers, labels, params in [("stats", None, None, {}), ("pca", "blocks.*", "topic", {}),
                                                ("cka", "blocks.*", None, {}),
                                                ("kmeans", "blocks.0", "topic", {"k_max": 4})]}
    return run_path, ids


def test_visualize_writes_an_offline_html_figure(analysed, tmp_path, capsys):
    run, ids = analysed
    out = tmp_path / "pca.html"
    assert main(["visualize", str(run), "pca", "--out", str(out), "--layer", "blocks.2"]) == 0
    page = out.read_text()
    assert ("PCA \\u00b7 blocks.2" in page or "PCA · blocks.2" in page) and "#7: prompt number 7" in page  # hover text
    assert not re.search(r"<script[^>]+src=\"https?:", page)  # plotly.js inlined, nothing fetched
    assert ids["pca"] in capsys.readouterr().out
    by_id = tmp_path / "cka.html"
    assert main(["visualize", str(run), ids["cka"], "-o", str(by_id)]) == 0
    assert "layer x layer cka" in by_id.read_text()


@pytest.mark.skipif(not HAS_BROWSER, reason="PNG/SVG export needs Chromium (apt-get install chromium); "
                    ".ci/run installs it")
def test_visualize_exports_png_and_svg_through_kaleido(analysed, tmp_path):
    run, _ = analysed
    png, svg = tmp_path / "pca.png", tmp_path / "stats.svg"
    assert main(["visualize", str(run), "pca", "-o", str(png), "--width", "500", "--height", "400"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["visualize", str(run), "stats", "-o", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<svg") and "neuron statistics per layer" in svg.read_text()


def test_visualize_mistakes_are_one_line_exit_2(analysed, tmp_path, capsys):
    run, _ = analysed
    assert main(["visualize", str(run), "nope", "-o", str(tmp_path / "x.html")]) == 2
    assert "no artifact 'nope'" in capsys.readouterr().err
    assert main(["visualize", str(run), "pca", "-o", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .html, .png or .svg" in capsys.readouterr().err
    assert main(["visualize", str(run), "pca", "-o", str(tmp_path / "x.html"), "--layer", "blocks.9"]) == 2
    assert "no unit 'blocks.9'" in capsys.readouterr().err
    assert main(["visualize", str(tmp_path / "missing"), "pca", "-o", str(tmp_path / "x.html")]) == 2


def test_report_holds_every_analysis_and_plotly_once(analysed, tmp_path, capsys):
    run, ids = analysed
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    for artifact_id in ids.values():
        assert f'id="{artifact_id}"' in page
    assert page.count("plotly.js v") == 1  # the library's own banner: inlined exactly once
    assert not re.search(r"<script[^>]+src=", page)
    assert "participation_ratio" in page and "Parameters" in page and "blocks.1" in page
    assert page.count('class="plotly-graph-div"') >= 3 + 1 + 1 + 1  # pca x 3 layers, stats, cka, kmeans
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(tmp_path / "r.pdf")]) == 2
