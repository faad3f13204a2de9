"""How fast the dashboard's pages answer on a 100,000-sample run (target: under 2 s each).

Writes a synthetic run with the real `neuronmap.store.RunWriter` (100,000 samples, 4 layers of 256
float32 features, 10 topic labels), adds `stats` and `pca` artifacts on one layer, then times each
page two ways:

- server: the Python work behind a page (its layout plus every callback it fires on load), cold
  (a fresh app without background prefetch, empty memory and disk caches, first visit), warm (second
  visit) and restart (a fresh app over the disk cache under ``<run>/.cache/dashboard/``);
- browser (when /usr/bin/chromium is there): navigation until the page's main element is drawn,
  in headless Chromium driven by playwright, in the app as users get it (the Run page visit, which
  comes first, starts the background prefetch of the run's layer summaries and CKA matrix).

    python benchmarks/dashboard_scale.py [--samples 100000] [--features 256] [--out DIR] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

RUN_ID = "synthetic-100k"


def write_run(root: Path, n: int, d: int, layers: int, shard: int = 25_000) -> Path:
    from neuronmap.store import Manifest, RunWriter

    path = root / RUN_ID
    names = [f"blocks.{i}" for i in range(layers)]
    manifest = Manifest.new(model="synthetic", config_hash="bench", tokenizer="none",
                            layers={k: dict(shape=[d], dtype="float32", kind="hidden", per_token=False) for k in names},
                            pooling="mean", dtype="float32", prompt_source="synthetic", prompt_source_hash="bench",
                            n_samples=n)
    rng = np.random.default_rng(0)
    topics = rng.integers(0, 10, n)
    centres = rng.standard_normal((10, d)).astype(np.float32)
    writer = RunWriter(path, manifest)
    writer.write_prompts(pd.DataFrame({"text": [f"synthetic prompt {i} about topic {t}" for i, t in enumerate(topics)],
                                       "topic": [f"topic-{t}" for t in topics]}))
    for index, start in enumerate(range(0, n, shard)):
        end = min(n, start + shard)
        for depth, name in enumerate(names):
            x = centres[topics[start:end]] * (depth + 1) + rng.standard_normal((end - start, d)).astype(np.float32)
            writer.write_shard(name, index, rows=(start, end), samples=(start, end), activations=x,
                               sample_ids=np.arange(start, end, dtype=np.int64))
    writer.complete()
    return path


def server_timings(root: Path, pages: list[tuple[str, str, dict]]) -> dict[str, dict[str, float]]:
    """Seconds of the Python work behind each page (layout + load callbacks).

    cold: a fresh app (no background prefetch) and an empty disk cache, first visit; warm: the same
    app, second visit; restart: another fresh app over the disk cache the cold visit left.
    """
    from dashboards import diskcache, layerview
    from dashboards.app import create_app
    from dashboards.pages import analysis_artifact, compare, gallery, layer, run, runs
    from neuronmap import viz

    def load(ctx, name: str, query: dict) -> None:
        repo = ctx.repository
        module = {"runs": runs, "run": run, "layer": layer, "layer-no-artifacts": layer, "gallery": gallery,
                  "artifact": analysis_artifact, "compare": compare}[name]
        module.layout(ctx, query)
        if name == "run":
            repo.prompts(query["run"]).head(15)
            from dashboards.pages.run import filter_prompts
            filter_prompts(repo.prompts(query["run"]), "topic", None, None)
        elif name.startswith("layer"):  # the scatter, distribution and heatmap callbacks
            proj = layerview.projection(repo, query["run"], query["layer"], "pca")
            values, _ = layerview.colour(repo, query["run"], query["layer"], "topic", proj)
            viz.pca_scatter(proj.coords, proj.explained, color=values, ids=proj.rows,
                            hover=layerview.texts(repo, query["run"], proj.sample_ids))
            found = layerview.summary(repo, query["run"], query["layer"])
            viz.layer_distributions({"x": found.values}, kind="histogram")
            viz.activation_heatmap(found.heat_x, neurons=found.top, max_rows=layerview.HEAT_ROWS)
        elif name == "artifact":
            viz.figure_for_artifact(repo.artifact(query["run"], query["id"]), prompts=repo.prompts(query["run"]))
        elif name == "compare":
            compare.cka_matrix(repo, query["run"], None)

    def timed(ctx, name: str, query: dict) -> float:
        started = time.perf_counter()
        load(ctx, name, query)
        return time.perf_counter() - started

    out: dict[str, dict[str, float]] = {}
    for name, _, query in pages:
        diskcache.clear(root / RUN_ID)
        app = create_app(root, workers=1, prefetch=False)
        cold, warm = timed(app.neuronmap, name, query), timed(app.neuronmap, name, query)
        app.neuronmap.jobs.shutdown()
        app = create_app(root, workers=1, prefetch=False)
        restart = timed(app.neuronmap, name, query)
        app.neuronmap.jobs.shutdown()
        out[name] = {"cold_s": round(cold, 3), "warm_s": round(warm, 3), "restart_s": round(restart, 3)}
    return out


def reduction_baselines(root: Path, layers: int) -> dict[str, float]:
    """The two reductions behind the slow cold pages, old way vs new way, on the same samples.

    Old: a full SVD of the centred 20,000-row sample (PCA preview) and `linear_cka` once per layer
    pair (Compare). New: `reduce.sample_pca` (covariance + eigh) and `reduce.linear_cka_matrix`
    (each layer centred once).
    """
    from neuronmap.analysis.cka import linear_cka

    from dashboards.data import Repository
    from dashboards.reduce import linear_cka_matrix, sample_pca

    repo = Repository(root)
    x = repo.layer_sample(RUN_ID, "blocks.1").x
    started = time.perf_counter()
    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    np.linalg.svd(centred, full_matrices=False)
    svd_s = time.perf_counter() - started
    started = time.perf_counter()
    sample_pca(x, k=3)
    pca_s = time.perf_counter() - started
    xs = [repo.layer_sample(RUN_ID, f"blocks.{i}", max_rows=2000).x for i in range(layers)]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(layers):
            for j in range(layers):
                if i != j:
                    linear_cka(xs[i], xs[j])
    pairwise_s = time.perf_counter() - started
    started = time.perf_counter()
    linear_cka_matrix(xs)
    matrix_s = time.perf_counter() - started
    return {"pca_full_svd_s": round(svd_s, 3), "pca_covariance_s": round(pca_s, 3),
            "pca_speedup": round(svd_s / max(pca_s, 1e-9), 1), "cka_pairwise_s": round(pairwise_s, 3),
            "cka_matrix_s": round(matrix_s, 3), "cka_speedup": round(pairwise_s / max(matrix_s, 1e-9), 1)}


def browser_timings(root: Path, pages: list[tuple[str, str, dict]], ready: dict[str, str],
                    prefetch: bool = True) -> dict[str, dict]:
    """Seconds from navigation to the page's main element in headless Chromium, first and second visit."""
    import logging

    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    from dashboards import diskcache
    from dashboards.app import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    diskcache.clear(root / RUN_ID)
    app = create_app(root, workers=1, prefetch=prefetch)  # default: the Run page visit starts the prefetch
    httpd = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    out: dict[str, dict] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base + "/")  # load Dash's JavaScript once, as a user's first page would
            page.wait_for_selector("#runs-list", timeout=60_000)
            for name, path, _ in pages:
                times = []
                for _ in range(2):
                    started = time.perf_counter()
                    page.goto(base + path)
                    page.wait_for_selector(ready[name], timeout=120_000)
                    times.append(time.perf_counter() - started)
                out[name] = {"first_s": round(times[0], 3), "second_s": round(times[1], 3)}
            browser.close()
    finally:
        httpd.shutdown()
        app.neuronmap.jobs.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="runs folder to use (default: a temp folder, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-prefetch", action="store_true", help="browser pass without the background prefetch")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    from neuronmap.analysis import analyze

    root = args.out or Path(tempfile.mkdtemp(prefix="nm-dashboard-bench-"))
    try:
        started = time.perf_counter()
        if not (root / RUN_ID / "manifest.json").is_file():
            write_run(root, args.samples, args.features, args.layers)
        write_s = time.perf_counter() - started
        with warnings.catch_warnings(), threadpool_limits(limits=2):
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            stats = analyze(root / RUN_ID, "stats", layers="blocks.3")
            pca = analyze(root / RUN_ID, "pca", layers="blocks.3", labels="topic", params={"n_components": 10})
            analyse_s = time.perf_counter() - started
        q = {"run": RUN_ID}
        pages = [
            ("runs", "/", {}),
            ("run", f"/run?run={RUN_ID}", q),
            ("layer", f"/layer?run={RUN_ID}&layer=blocks.3", {**q, "layer": "blocks.3"}),
            ("layer-no-artifacts", f"/layer?run={RUN_ID}&layer=blocks.1", {**q, "layer": "blocks.1"}),
            ("artifact", f"/artifact?run={RUN_ID}&id={pca.id}", {**q, "id": pca.id}),
            ("gallery", "/gallery", {}),
            ("compare", f"/compare?run={RUN_ID}", q),
        ]
        # 20,000 drawn points use WebGL (no SVG points): wait for the callback's caption / the figure's title
        ready = {"runs": "#runs-list", "run": "#prompt-table td", "layer": "#scatter-source:has-text('points drawn')",
                 "layer-no-artifacts": "#scatter-source:has-text('points drawn')",
                 "artifact": "#artifact-graph .gtitle", "gallery": "#gallery-grid",
                 "compare": "#compare-graph .heatmaplayer"}
        results = {"samples": args.samples, "features": args.features, "layers": args.layers,
                   "write_run_s": round(write_s, 1), "stats_and_pca_s": round(analyse_s, 1),
                   "artifacts": [stats.id, pca.id], "server": server_timings(root, pages)}
        print(json.dumps(results["server"]), flush=True)
        results["reductions"] = reduction_baselines(root, args.layers)
        print(json.dumps(results["reductions"]), flush=True)
        if not args.no_browser and Path("/usr/bin/chromium").exists():
            try:
                results["browser"] = browser_timings(root, pages, ready, prefetch=not args.no_prefetch)
                results["browser_prefetch"] = not args.no_prefetch
            except Exception as error:  # the server numbers stand on their own
                results["browser_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        print(json.dumps(results, indent=2))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
