"""Compare: layer x layer CKA within a run, or between the layers of two runs of the same prompts."""

from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, html

from neuronmap import viz
from neuronmap.errors import ConfigError, NeuronMapError

from .. import diskcache, reduce
from ..components import ANY, card, empty_state, error_state, graph, header, labelled, options, picked

PATH = "/compare"
TITLE = "Compare"
IN_NAV = True
SAMPLE = 2000
MAX_LAYERS = 24


def layout(ctx, query: dict) -> html.Div:
    runs = [e.id for e in ctx.repository.runs(fresh=True) if e.ok]
    if not runs:
        return html.Div([header("Compare"), empty_state("No readable runs to compare.")])
    first = query.get("run") if query.get("run") in runs else runs[0]
    other = query.get("other") if query.get("other") in runs else ANY
    controls = dbc.Row([
        dbc.Col(labelled("Run (rows)", dbc.Select(id="compare-run", options=options(runs), value=first), "compare-run"),
                md=6),
        dbc.Col(labelled("Compare with (columns)", dbc.Select(id="compare-other", value=other,
                                                              options=options(runs, blank="the same run")),
                         "compare-other"), md=6),
    ], className="g-2")
    return html.Div([header("Compare", "Linear CKA between layers: 1 = same representation up to rotation and scale"),
                     controls, html.Div(id="compare-source", className="small text-muted mb-2"),
                     card("CKA", graph({}, id="compare-graph", height=560))])


def _samples(repo, run_id: str, layers: list[str]):
    return {layer: repo.layer_sample(run_id, layer, max_rows=SAMPLE) for layer in layers}


def _other_digest(other) -> str:
    """The digest cka's ``other_run_shards`` parameter records for run `other`'s present shards."""
    from neuronmap.analysis.registry import get_analysis

    return get_analysis("cka").params.model_construct(other_run=str(other.path)).other_run_shards


def exact_artifact(repo, run_id: str, other_id: str | None):
    """The newest current `cka` artifact of `run_id` for this view, or None.

    Within a run: one without ``other_run`` over at least 2 layers. Against another run: one whose
    ``other_run_shards`` is the digest of that run's present shards (the same data, wherever the
    artifact's ``other_run`` path pointed from). Current: computed on `run_id`'s present shards.
    """
    same = not other_id or other_id == run_id
    if same:
        def wanted(artifact) -> bool:
            return not (artifact.result.get("params") or {}).get("other_run") \
                and len(artifact.result.get("layers", [])) >= 2
    else:
        digest = _other_digest(repo.run(other_id))

        def wanted(artifact) -> bool:
            params = artifact.result.get("params") or {}
            return bool(params.get("other_run")) and params.get("other_run_shards") == digest
    return repo.newest(run_id, "cka", where=wanted, current=True)


def _row_space(run, layers: list[str]) -> str:
    kinds = {bool(run.layer_info(l).per_token) for l in layers}
    return "mixed" if len(kinds) > 1 else ("per-token" if kinds == {True} else "per-prompt")


def cka_matrix(repo, run_id: str, other_id: str | None) -> tuple[np.ndarray, list[str], list[str], str]:
    """(matrix, row layers, column layers, where the numbers come from).

    The newest current `cka` artifact for the view (`exact_artifact`) gives exact numbers; without
    one the matrix is computed on a seeded sample of `SAMPLE` rows (`reduce.linear_cka_matrix`: each
    layer centred once) and kept in memory and in the run's disk cache. ConfigError (one line) when
    the rows of the two runs do not pair up: other prompts, or per-token against per-prompt rows.
    """
    run = repo.run(run_id)
    rows = [l for l in run.layers if run.layer_info(l).kind == "hidden"][:MAX_LAYERS]
    artifact = exact_artifact(repo, run_id, other_id)
    if artifact is not None:
        frame = viz.pair_frame(artifact, "cka", 1.0)
        method = (artifact.result.get("params") or {}).get("method", "linear")
        return frame.to_numpy(), list(frame.index), list(frame.columns), \
            f"exact{'' if method == 'linear' else f' ({method} CKA)'}, from artifact {artifact.id}"
    if not other_id or other_id == run_id:
        other_id, columns = run_id, rows
    else:
        other = repo.run(other_id)
        if other.manifest.n_samples != run.manifest.n_samples:
            raise ConfigError(f"run {other_id} has {other.manifest.n_samples} samples but {run_id} has "
                                 f"{run.manifest.n_samples}: CKA between runs compares the same prompts")
        columns = [l for l in other.layers if other.layer_info(l).kind == "hidden"][:MAX_LAYERS]
        mine, theirs = _row_space(run, rows), _row_space(other, columns)
        if rows and columns and mine != theirs:
            raise ConfigError(f"run {run_id} holds {mine} rows and {other_id} {theirs} rows: per-token and "
                              "per-prompt runs cannot be compared row by row; extract both with the same pooling")
    if not rows or not columns:
        return np.empty((len(rows), len(columns))), rows, columns, "no hidden layers"
    same = other_id == run_id
    other = repo.run(other_id)
    digests = [diskcache.run_digest(run, rows), diskcache.run_digest(other, columns)]
    unit = "token rows" if _row_space(run, rows) == "per-token" else "samples"

    def from_samples() -> dict[str, np.ndarray]:
        mine = _samples(repo, run_id, rows)
        theirs = mine if same else _samples(repo, other_id, columns)
        reference = mine[rows[0]].sample_ids
        aligned = lambda found: [l for l, s in found.items() if np.array_equal(s.sample_ids, reference)]  # noqa: E731
        left, right = aligned(mine), aligned(theirs)
        matrix = np.full((len(rows), len(columns)), np.nan)
        if left and right:
            part = reduce.linear_cka_matrix([mine[l].x for l in left], None if same else [theirs[l].x for l in right])
            matrix[np.ix_([rows.index(l) for l in left], [columns.index(l) for l in right])] = part
        return {"matrix": matrix, "n": np.asarray(len(reference))}

    def compute():
        key = ["cka", rows, columns, SAMPLE, digests]
        arrays = diskcache.cached(run.path, f"cka/{other_id}", key, from_samples)
        if np.isnan(arrays["matrix"]).all():
            raise ConfigError(f"the rows of {run_id} and {other_id} do not hold the same samples in the same "
                              "order (other tokenization or other prompts): they cannot be compared row by row")
        return arrays["matrix"], (f"computed on a seeded sample of {int(arrays['n']):,} {unit}; "
                                  "run `neuronmap analyze RUN cka` for exact values")

    matrix, source = repo.derived(("compare", run_id, other_id, *digests), compute)
    return matrix, rows, columns, source


def register(app, ctx) -> None:
    @app.callback(Output("compare-graph", "figure"), Output("compare-source", "children"),
                  Input("compare-run", "value"), Input("compare-other", "value"))
    def compare(run_id, other_id):
        other_id = picked(other_id)
        try:
            matrix, rows, columns, source = cka_matrix(ctx.repository, run_id, other_id or None)
        except NeuronMapError as error:
            return {}, error_state(str(error), title="These runs cannot be compared")
        if not rows or not columns:
            return {}, "no hidden layers to compare"
        title = f"CKA · {run_id}" + (f" vs {other_id}" if other_id and other_id != run_id else "")
        return viz.cka_heatmap(matrix, rows, columns, title=title), source
