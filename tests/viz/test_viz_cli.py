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


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "internal error" not in err, err
    return lines[0]


def test_output_inside_a_regular_file_is_one_line_and_leaves_nothing(analysed, tmp_path, capsys):
    run, ids = analysed
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "afile").write_text("x")
    for argv, name in ((["report", str(run)], "r.html"), (["visualize", str(run), ids["cka"]], "v.html")):
        out = tmp_path / "bad" / "afile" / name
        assert main([*argv, "--out", str(out)]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"could not write {out}: {tmp_path / 'bad' / 'afile'} is a file, not a folder" in line
        assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["afile"]
        assert (tmp_path / "bad" / "afile").read_text() == "x"



def test_an_existing_output_file_is_replaced_only_when_asked(analysed, tmp_path, capsys):
    run, ids = analysed
    for argv in (["report", str(run)], ["visualize", str(run), ids["cka"]]):
        out = tmp_path / "mine.html"
        out.write_text("keep me")
        assert main([*argv, "--out", str(out)]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"--out {out} already exists" in line and "--overwrite" in line
        assert out.read_text() == "keep me"
        assert main([*argv, "--out", str(out), "--overwrite"]) == 0
        capsys.readouterr()
        assert out.read_text() != "keep me" and "<html" in out.read_text().lower()

@pytest.mark.parametrize("option, value", [("--width", "20000"), ("--height", "20000"), ("--width", "0"),
                                           ("--width", "-5"), ("--height", "0")])
def test_image_size_outside_what_chromium_renders_is_refused(analysed, tmp_path, capsys, option, value):
    run, _ = analysed
    out = tmp_path / "v.png"
    assert main(["visualize", str(run), "cka", "--out", str(out), option, value]) == 2
    assert f"{option} {value} must be between 1 and 16384 pixels" in _one_line_error(capsys.readouterr().err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bytes_that_are_not_an_image_are_never_written(tmp_path):
    from dashboards.export import figure_bytes, write_figure

    from neuronmap.errors import ConfigError

    class Garbage:
        """A figure whose export returns what kaleido returned for 20000 x 20000 (3 bytes, no PNG)."""

        def to_image(self, format, width, height, scale):
            return b"u\xabZ"

    with pytest.raises(ConfigError, match="kaleido returned 3 bytes that are not a PNG image"):
        figure_bytes(Garbage(), "png", 500, 400)
    with pytest.raises(ConfigError, match="not a SVG image"):
        write_figure(Garbage(), tmp_path / "v.svg", 500, 400)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_artifact_is_named_by_visualize_and_report(analysed, tmp_path, capsys):
    run, ids = analysed
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damaged = sorted(p for p in (copy / "analyses").iterdir() if p.name.startswith("kmeans-"))
    for folder in damaged:  # every kmeans artifact: asking by name has no readable one to fall back on
        (folder / "result.json").write_text("{bad", encoding="utf-8")
    for key in ("kmeans", ids["kmeans"]):
        assert main(["visualize", str(copy), key, "--out", str(tmp_path / "v.html")]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert "cannot read" in line and "kmeans-" in line and "the artifact is damaged" in line
    assert not (tmp_path / "v.html").exists()
    out = tmp_path / "r.html"
    assert main(["report", str(copy), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert [line.split(":")[1].strip() for line in warned] == [f"skipped unreadable artifact {f.name}"
                                                              for f in damaged], captured.err
    page = out.read_text()
    assert f"skipped unreadable artifact <code>{ids['kmeans']}</code>" in page and f'id="{ids["pca"]}"' in page
