"""A runs folder with a real tiny run (tiny GPT-2 through neuronmap.extract) and analyses, the app on
127.0.0.1 in a thread, and headless Debian Chromium driven by playwright (never `playwright install`)."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NEURONMAP_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "screenshots"
from dashtest_util import HEADS_ID, RUN_ID  # noqa: E402


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory, tiny_model_dir):
    import pandas as pd
    from threadpoolctl import threadpool_limits

    import neuronmap
    from neuronmap.analysis import analyze

    root = tmp_path_factory.mktemp("dashboard") / "runs"
    questions = pd.read_csv(Path(neuronmap.__file__).parent / "data" / "questions.csv")
    prompts = questions.groupby("topic", group_keys=False).head(4).reset_index(drop=True)[["text", "topic", "sentiment"]]
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        run = neuronmap.extract(str(tiny_model_dir("gpt2")), prompts, layers="blocks.*", out=root / RUN_ID,
                                pooling="mean", progress=False)
        neuronmap.extract(str(tiny_model_dir("gpt2")), prompts.head(6), layers="blocks.*.attn.pattern",
                          out=root / HEADS_ID, pooling="none", progress=False)
        ids = {"stats": analyze(run, "stats").id,
               "pca": analyze(run, "pca", labels="topic", params={"project": 3}).id,
               "kmeans": analyze(run, "kmeans", labels="topic", params={"k_max": 4}).id}
    broken = root / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    return root, ids


@pytest.fixture(scope="session")
def server(runs_dir):
    """Base URL of the dashboard served by werkzeug on a free 127.0.0.1 port."""
    pytest.importorskip("dash", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    from dashboards.app import create_app

    app = create_app(runs_dir[0], workers=1)
    httpd = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", app
    httpd.shutdown()
    app.neuronmap.jobs.shutdown()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium chromium-driver; "
                    ".ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


class Page:
    """A browser tab that records console errors and uncaught page errors."""

    def __init__(self, page, base: str):
        self.page, self.base, self.errors = page, base, []
        page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def open(self, path: str, ready: str, timeout: float = 30_000):
        self.page.goto(self.base + path)
        self.page.wait_for_selector(ready, timeout=timeout)
        self.page.wait_for_load_state("networkidle")
        return self.page

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def tab(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = Page(context.new_page(), server[0])
    page.page.set_default_timeout(30_000)
    yield page
    context.close()
