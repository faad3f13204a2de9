"""Pages without a browser: what they say about interrupted runs, damaged files and bad launches.

Each test builds the page's layout (or calls the function its callback calls) on a real run of the tiny
GPT-2 (`conftest.runs_dir`), damaged where the test needs it in a copy under `tmp_path`, and reads the
text the user would see.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from dashtest_util import HEADS_ID, RUN_ID

pytest.importorskip("dash", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")

import dash  # noqa: E402

from dashboards.components import ANY, Context  # noqa: E402
from dashboards.data import Repository  # noqa: E402
from dashboards.jobs import JobManager, dashboard_wording  # noqa: E402
from dashboards.pages import attention as attention_page  # noqa: E402
from dashboards.pages import gallery, jobs as jobs_page, launch, run as run_page, runs as runs_page  # noqa: E402
from neuronmap.errors import ConfigError  # noqa: E402
from neuronmap.store import RunWriter, load_manifest, open_run  # noqa: E402
from neuronmap.store.manifest import write_manifest  # noqa: E402


def text_of(node) -> str:
    """Every string a Dash component tree shows, joined by spaces."""
    if node is None or isinstance(node, bool):
        return ""
    if isinstance(node, (str, int, float)):
        return str(node)
    if isinstance(node, (list, tuple)):
        return " ".join(text_of(child) for child in node)
    return text_of(getattr(node, "children", None))


def find(node, component_id: str):
    """The component with `id` in a Dash component tree (None when there is none)."""
    if isinstance(node, (list, tuple)):
        for child in node:
            found = find(child, component_id)
            if found is not None:
                return found
        return None
    if node is None or isinstance(node, (str, int, float, bool)):
        return None
    if getattr(node, "id", None) == component_id:
        return node
    return find(getattr(node, "children", None), component_id)


@pytest.fixture
def context():
    made = []

    def make(root) -> Context:
        repo = Repository(root)
        ctx = Context(repo, JobManager(repo, workers=1), None)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.jobs.shutdown()


def copy_run(runs_dir, tmp_path, name: str, source: str = RUN_ID):
    """A copy of the session's run `source` at `tmp_path/runs/name` (to damage freely)."""
    root = tmp_path / "runs"
    # `.tmp-*`: an artifact another test's job is still writing comes and goes while the tree is copied
    shutil.copytree(runs_dir[0] / source, root / name, ignore=shutil.ignore_patterns(".cache", ".tmp-*"))
    return root, root / name


def stop_extraction(path, idle_s: float) -> None:
    """Make the run at `path` look like an extraction killed `idle_s` seconds ago after its first shards:
    the last shard of every layer gone, status `running`, nothing committed since."""
    manifest = load_manifest(path)
    last = max(shard.index for shard in manifest.shards)
    for shard in manifest.shards:
        if shard.index == last:
            (path / shard.path).unlink()
    manifest.shards = [shard for shard in manifest.shards if shard.index != last]
    manifest.status = "running"
    then = time.time() - idle_s
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(then))
    write_manifest(path, manifest)
    os.utime(path / "manifest.json", (then, then))


# -- 1. a killed extraction ----------------------------------------------------------------------------
def test_a_killed_extraction_is_reported_interrupted_with_a_command_that_resumes_it(tmp_path, tiny_model_dir,
                                                                                     context, request):
    import neuronmap
    from neuronmap.cli import main

    questions = pd.DataFrame({"text": [f"Prompt number {i} is about {w}" for i, w in
                                       enumerate(["cats", "dogs", "rain", "sun", "maths", "music"])],
                              "topic": ["a", "a", "b", "b", "c", "c"]})
    csv = tmp_path / "prompts.csv"
    questions.to_csv(csv, index=False)
    root = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neuronmap.extract(str(tiny_model_dir("gpt2")), csv, layers="blocks.0,blocks.1", out=root / "killed",
                          samples_per_shard=2, batch_size=2, max_length=32, progress=False)
        neuronmap.extract(str(tiny_model_dir("gpt2")), csv, layers="blocks.0,blocks.1", out=root / "live",
                          samples_per_shard=2, batch_size=2, max_length=32, progress=False)
    whole = open_run(root / "killed").array("blocks.1")
    stop_extraction(root / "killed", idle_s=3 * 3600)
    stop_extraction(root / "live", idle_s=3 * 3600)  # idle as long: only the writing lock tells them apart
    holder = RunWriter.attach(root / "live")  # a process writing it (as an extraction's writer does)
    request.addfinalizer(holder.close)
    ctx = context(root)

    entries = {entry.id: entry for entry in ctx.repository.runs(fresh=True)}
    killed, live = entries["killed"], entries["live"]
    assert killed.status == "running" and killed.interrupted and killed.state == "interrupted"
    assert not live.interrupted and live.state == "running"
    assert "interrupted after 67% of its rows" in killed.interruption  # 2 of 3 shards kept
    assert "3.0 h" in killed.interruption

    # Runs page: the badge says interrupted and the row gives the command.
    row = text_of(runs_page._row(killed))
    assert "interrupted" in row and killed.resume_command in row and "running" not in row
    # Run page: no "still being extracted" for the killed run; the live one keeps it.
    page = text_of(run_page.layout(ctx, {"run": "killed"}))
    assert "was interrupted" in page and killed.resume_command in page and "still being extracted" not in page
    assert "still being extracted" in text_of(run_page.layout(ctx, {"run": "live"}))
    # Jobs page: only the live one is "in progress"; the killed one is listed apart with its command.
    panel = jobs_page.extractions(ctx)
    running, stopped = text_of(find(panel, "jobs-running")), text_of(find(panel, "jobs-interrupted"))
    assert "live" in running and "killed" not in running
    assert "killed" in stopped and killed.resume_command in stopped

    # The command given really resumes the run: it completes with the rows of an uninterrupted extraction.
    argv = shlex.split(killed.resume_command)
    assert argv[:2] == ["neuronmap", "extract"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv[1:] + ["--quiet"]) == 0
    resumed = open_run(root / "killed")
    assert resumed.manifest.status == "complete"
    np.testing.assert_array_equal(resumed.array("blocks.1"), whole)
    assert not {e.id: e for e in ctx.repository.runs(fresh=True)}["killed"].interrupted


def test_without_a_writing_lock_a_long_idle_run_counts_as_interrupted(tmp_path, tiny_model_dir):
    """Runs written before the writing lock existed: time decides (a run idle for hours was killed, one
    that committed seconds ago is running)."""
    import neuronmap
    from dashboards import runstate
    from neuronmap.store.liveness import WRITING_NAME

    csv = tmp_path / "prompts.csv"
    pd.DataFrame({"text": [f"Prompt {i} about {w}" for i, w in enumerate("abcdef")]}).to_csv(csv, index=False)
    for name in ("old", "recent"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            neuronmap.extract(str(tiny_model_dir("gpt2")), csv, layers="blocks.0", out=tmp_path / name,
                              samples_per_shard=2, progress=False)
        (tmp_path / name / WRITING_NAME).unlink()
    stop_extraction(tmp_path / "old", idle_s=3 * 3600)
    stop_extraction(tmp_path / "recent", idle_s=5)
    assert runstate.is_interrupted(tmp_path / "old", load_manifest(tmp_path / "old"))
    assert not runstate.is_interrupted(tmp_path / "recent", load_manifest(tmp_path / "recent"))


# -- 2. launch refuses at once what the analysis would refuse --------------------------------------------
def test_launch_refuses_what_the_analysis_would_refuse_before_starting_in_the_forms_words(runs_dir, context):
    root = runs_dir[0]
    ctx = context(root)
    layers = open_run(root / RUN_ID).layers
    cases = [
        (("probe", ["blocks.0"]), {}, "probe needs a label column: choose one under Label column"),
        (("mutual-info", ["blocks.0"]), {}, "needs a label column"),
        (("cka", ["blocks.0"]), {}, "select at least 2 layers"),
        (("pca", ["blocks.0"]), {"params": {"n_components": 500}}, "n_components=500 must be between 1 and "
                                                                  "min(n_samples, n_features)=40"),
        (("tsne", ["blocks.0"]), {"params": {"perplexity": 50}}, "set perplexity=13 under Parameters"),
    ]
    for (analysis, chosen), kwargs, expected in cases:
        with pytest.raises(ConfigError) as caught:
            ctx.jobs.submit(RUN_ID, analysis, chosen, **kwargs)
        message = str(caught.value)
        assert expected in message, message
        assert "--" not in message and str(root) not in message, message
    assert ctx.jobs.jobs() == []  # nothing was queued
    # what the checks let through still starts
    job = ctx.jobs.submit(RUN_ID, "cka", layers[:2])
    assert job.status in ("queued", "running", "done")
    deadline = time.monotonic() + 60  # finish it here: later tests copy this run's folder
    while job.status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.status == "done", job.message


def test_analysis_messages_are_reworded_for_the_form(tmp_path):
    run = tmp_path / "runs" / "demo"
    assert dashboard_wording(f"analysis probe needs a label column: pass --labels COLUMN (labels=...); run {run} "
                             "has label columns: topic", run, "demo") == \
        "analysis probe needs a label column: choose one under Label column; run demo has label columns: topic"
    assert dashboard_wording("perplexity=30 must be less than n_samples=20; pass --param perplexity=6 or analyse "
                             "more rows", run, "demo") == \
        "perplexity=30 must be less than n_samples=20; set perplexity=6 under Parameters or analyse more rows"
    assert dashboard_wording("analysis cka compares layers: select at least 2 (got blocks.0); use --layers with a "
                             "glob such as 'blocks.*'", run, "demo").endswith("select more layers")
    assert dashboard_wording(f"label column 'x' is not in run {run}'s prompts", run, "demo") == \
        "label column 'x' is not in run demo's prompts"


def test_a_reused_artifact_shows_as_reused_not_as_zero_tasks(runs_dir, tmp_path, context):
    root, _ = copy_run(runs_dir, tmp_path, "copy")
    ctx = context(root)
    existing = next(a for a in ctx.repository.artifacts("copy") if a.analysis == "stats")
    job = ctx.jobs.submit("copy", "stats", existing.result["layers"])
    deadline = time.time() + 60
    while job.status in ("queued", "running") and time.time() < deadline:
        time.sleep(0.05)
    assert job.status == "done" and job.reused and job.artifact_id == existing.id, job.message
    shown = text_of(launch.job_rows(ctx))
    assert "reused" in shown and "0/? tasks" not in shown


# -- 3. attention with an unknown sample ---------------------------------------------------------------
def test_attention_with_an_unknown_sample_says_so_and_shows_the_first_prompt(runs_dir, context):
    ctx = context(runs_dir[0])
    first = int(ctx.repository.prompts(HEADS_ID)["sample_id"].iloc[0])
    page = attention_page.layout(ctx, {"run": HEADS_ID, "sample": "99999"})
    assert find(page, "attention-prompt").value == first
    assert "no prompt with sample_id 99999" in text_of(find(page, "attention-note"))
    layer = find(page, "attention-layer").value
    fig, caption, heads, head = attention_page.draw_pattern(ctx.repository, HEADS_ID, first, layer, 0)
    assert len(heads) == 4 and head == "0" and f"prompt #{first}" in fig.layout.title.text
    # a cleared prompt box neither fails nor empties the Head select
    _, caption, heads, head = attention_page.draw_pattern(ctx.repository, HEADS_ID, None, layer, "2")
    assert "Pick a prompt" in text_of(caption) and heads is dash.no_update and head is dash.no_update
    assert find(attention_page.layout(ctx, {"run": HEADS_ID}), "attention-note") is None


# -- 4. a damaged artifact -----------------------------------------------------------------------------
def test_a_damaged_artifact_is_listed_with_its_error_on_the_run_page_and_in_the_gallery(runs_dir, tmp_path, context):
    root, path = copy_run(runs_dir, tmp_path, "damaged")
    pca_id = runs_dir[1]["pca"]
    result = path / "analyses" / pca_id / "result.json"
    result.write_text(result.read_text()[:200])
    ctx = context(root)
    assert pca_id not in {a.id for a in ctx.repository.artifacts("damaged")}  # what used to hide it

    listed = run_page._artifacts_list(ctx, "damaged")
    assert pca_id in text_of(listed) and "damaged" in text_of(listed)
    assert "cannot read damaged/analyses/" in text_of(listed) and str(root) not in text_of(listed)
    cards = gallery.gallery_cards(ctx, None, None, None)
    assert pca_id in text_of(cards) and "cannot read" in text_of(cards)
    assert pca_id in text_of(gallery.gallery_cards(ctx, None, "pca", None))
    assert pca_id not in text_of(gallery.gallery_cards(ctx, None, "stats", None))


# -- 5. a broken prompts.parquet -----------------------------------------------------------------------
def test_a_broken_prompt_table_gives_one_line_and_launch_still_offers_the_layers(runs_dir, tmp_path, context):
    root, path = copy_run(runs_dir, tmp_path, "noprompts")
    (path / "prompts.parquet").write_bytes(b"garbage!")
    ctx = context(root)
    layer_options, ticked, label_options, note = launch.run_choices(ctx, "noprompts")
    assert [o["value"] for o in layer_options] == open_run(path).layers and ticked
    assert [o["value"] for o in label_options] == [ANY]
    assert "prompts.parquet" in note and "--overwrite" in note and str(root) not in note
    assert "\n" not in note

    page = text_of(attention_page.layout(ctx, {"run": "noprompts"}))
    assert "prompts of run noprompts cannot be read" in page and "--overwrite" in page and str(root) not in page
    run = text_of(run_page.layout(ctx, {"run": "noprompts"}))
    assert "restore prompts.parquet" in run and str(root) not in run
    with pytest.raises(ConfigError, match="prompts.parquet"):
        ctx.jobs.submit("noprompts", "probe", ["blocks.0"])
    # the Layer explorer opens (the activations are whole) and says why there are no texts or labels
    from dashboards import layerview
    from dashboards.pages import layer as layer_page

    layer = text_of(layer_page.layout(ctx, {"run": "noprompts", "layer": "blocks.0"}))
    assert "prompts of run noprompts cannot be read" in layer and str(root) not in layer
    assert layerview.texts(ctx.repository, "noprompts", np.array([3, 5])) == ["#3", "#5"]


# -- 6. small ones -------------------------------------------------------------------------------------
def test_gallery_cards_show_the_label_column_and_unknown_filters_are_dropped(runs_dir, context):
    ctx = context(runs_dir[0])
    entry = next(e for e in ctx.repository.runs() if e.id == RUN_ID)
    pca = ctx.repository.artifact(RUN_ID, runs_dir[1]["pca"])
    stats = ctx.repository.artifact(RUN_ID, runs_dir[1]["stats"])
    assert "labels: topic" in text_of(gallery._card(entry, pca))
    assert "labels:" not in text_of(gallery._card(entry, stats))

    page = gallery.layout(ctx, {"analysis": "nonexist"})
    assert find(page, "gallery-analysis").value == ANY
    assert "nonexist" in text_of(find(page, "gallery-ignored"))
    page = gallery.layout(ctx, {"analysis": "pca"})
    assert find(page, "gallery-analysis").value == "pca" and find(page, "gallery-ignored") is None


def test_prompt_label_filter_ignores_case_and_reads_booleans_and_numbers():
    prompts = pd.DataFrame({"sample_id": [0, 1, 2, 3], "text": ["a", "b", "c", "d"],
                            "is_question": [True, False, True, False], "topic": ["Animals", "animals", "pets", "x"],
                            "length": [1.0, 2.0, 1.0, 3.0]})
    rows = lambda column, value: run_page.filter_prompts(prompts, "", column, value)["sample_id"].tolist()  # noqa: E731
    assert rows("is_question", "true") == rows("is_question", "True") == rows("is_question", "yes") == [0, 2]
    assert rows("is_question", "FALSE") == [1, 3]
    assert rows("topic", "animals") == rows("topic", " ANIMALS ") == [0, 1]
    assert rows("length", "1") == rows("length", "1.0") == [0, 2]
    assert rows("topic", "") == [0, 1, 2, 3] and rows("topic", "Pets") == [2]
