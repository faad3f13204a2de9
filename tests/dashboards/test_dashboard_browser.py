"""The dashboard in real headless Chromium: pages load cleanly, the main paths work, traversal is refused.

Screenshots of every page land in tests/dashboards/screenshots/ (ignored by git).
"""

from __future__ import annotations

import pytest
from dashtest_util import HEADS_ID, RUN_ID

pytest.importorskip("dash", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")

PAGES = [
    ("runs", "/", "#runs-list"),
    ("run", f"/run?run={RUN_ID}", "#layers-table"),
    ("layer", f"/layer?run={RUN_ID}&layer=blocks.1", "#layer-scatter .main-svg"),
    ("attention", f"/attention?run={HEADS_ID}", "#attention-graph .heatmaplayer"),
    ("compare", f"/compare?run={RUN_ID}", "#compare-graph .main-svg"),
    ("gallery", "/gallery", "#gallery-grid"),
    ("artifact-pca", f"/artifact?run={RUN_ID}&id={{pca}}", "#artifact-graph .main-svg"),
    ("artifact-stats", f"/artifact?run={RUN_ID}&id={{stats}}", "#artifact-graph .main-svg"),
    ("launch", f"/launch?run={RUN_ID}", "#launch-jobs"),
    ("jobs", "/jobs", "#system-meters"),
]


@pytest.mark.parametrize("name,path,ready", PAGES, ids=[p[0] for p in PAGES])
def test_every_page_loads_without_console_errors(tab, runs_dir, name, path, ready):
    page = tab.open(path.format(**runs_dir[1]), ready)
    assert page.locator(".error-state").count() == 0
    tab.shot(name)
    assert tab.errors == []


def test_runs_to_run_to_layer_scatter_shows_points_and_a_clicked_prompt(tab):
    page = tab.open("/", "#runs-list")
    assert page.locator("#runs-list tr", has_text="broken").locator(".status-badge").inner_text() == "corrupt"
    page.get_by_role("link", name=RUN_ID).click()
    page.wait_for_selector("#layers-table")
    assert page.locator("#prompt-table").inner_text().count("topic") >= 1
    page.locator("#layers-table").get_by_role("link", name="blocks.2").click()
    page.wait_for_selector("#layer-scatter .scatterlayer path.point")
    points = page.locator("#layer-scatter .scatterlayer path.point")
    assert points.count() == 40  # every sample of the tiny run (PCA artifact, coloured by topic)
    assert page.locator("#layer-scatter .legendtext").count() == 10  # one legend entry per topic
    box = points.nth(5).bounding_box()  # plotly listens on the drag layer under the points: hover, then click
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.wait_for_selector("#layer-scatter .hoverlayer .hovertext")  # plotly clicks the hovered point
    page.mouse.click(x, y)
    page.wait_for_selector("#point-prompt")
    assert len(page.locator("#point-prompt").inner_text()) > 5
    tab.shot("layer-clicked")
    assert tab.errors == []


def test_head_viewer_draws_the_picked_layer_and_head(tab):
    page = tab.open(f"/run?run={HEADS_ID}", "#layers-table")
    page.click("#run-attention-link")
    page.wait_for_selector("#attention-graph .heatmaplayer")
    page.select_option("#attention-layer", "blocks.1.attn.pattern")
    page.select_option("#attention-head", "3")
    page.wait_for_selector("#attention-caption:has-text('head 3 of 4')")
    assert "blocks.1.attn.pattern · head 3" in page.locator("#attention-graph .gtitle").text_content()
    assert page.locator("#attention-graph .heatmaplayer").count() == 1
    tab.shot("attention-head")
    assert tab.errors == []


def test_launch_an_analysis_and_see_it_in_the_gallery(tab):
    page = tab.open(f"/launch?run={RUN_ID}", "#launch-jobs")
    page.select_option("#launch-analysis", "entropy")
    page.wait_for_selector("#launch-layers input[value='blocks.0']")
    page.locator("#launch-layers input[value='blocks.0']").check()
    page.fill("#launch-params", "bins=8")
    page.click("#launch-submit")
    page.wait_for_selector("#launch-ok")
    page.wait_for_selector(".job-result", timeout=60_000)
    tab.shot("launch-done")
    page.click(".job-result")
    page.wait_for_selector("#artifact-graph .main-svg")
    page = tab.open("/gallery?analysis=entropy", "#gallery-grid")
    cards = page.locator(".artifact-card", has_text="entropy")
    assert cards.count() == 1 and "bins" not in cards.first.inner_text()
    assert tab.errors == []


def test_a_bad_launch_says_why(tab):
    page = tab.open(f"/launch?run={RUN_ID}", "#launch-jobs")
    page.select_option("#launch-analysis", "pca")
    page.fill("#launch-params", "n_components=-3")
    page.click("#launch-submit")
    assert "n_components" in page.locator("#launch-error").inner_text()


@pytest.mark.parametrize("path", [
    "/run?run=../../etc", "/run?run=%2Fetc", "/layer?run=..%2F..%2F..&layer=blocks.0",
    f"/artifact?run={RUN_ID}&id=..%2F..%2Fmanifest.json", f"/artifact?run={RUN_ID}%2F..%2F..&id=x",
])
def test_path_traversal_ids_are_refused(tab, path):
    page = tab.open(path, ".error-state")
    assert "refused" in page.locator(".error-state").inner_text()
    assert tab.errors == []


def test_deleted_and_corrupt_runs_have_clear_error_states(tab):
    page = tab.open("/run?run=gone", ".error-state")
    assert "does not exist" in page.locator(".error-state").inner_text()
    page = tab.open("/run?run=broken", ".error-state")
    assert "manifest" in page.locator(".error-state").inner_text()
    tab.shot("error-corrupt")


def test_no_route_serves_files_outside_the_assets(tab, server):
    for path in ("/assets/../pyproject.toml", "/assets/%2e%2e/app.py", "/_dash-component-suites/../../etc/passwd"):
        response = tab.page.request.get(server[0] + path)
        assert response.status == 404 or "root:" not in response.text()
    assert tab.page.request.get(server[0] + "/").headers.get("x-frame-options") == "DENY"
