"""What the Layer explorer shows, computed from the run's artifacts when there are some, else from a sample.

Exact numbers come from artifacts (`stats`, `pca`, `tsne`, `kmeans` of that layer, newest first) that
are current, i.e. computed on the run's present shards (`Repository.current`: an artifact made
before an interrupted run was resumed covers only its first rows); without one, per-neuron
statistics and a PCA projection are computed on the layer's seeded sample of at most
`data.SAMPLE_ROWS` rows and labelled as such. Everything the page derives from the sample (the
statistics, the PCA projection, the values of the distribution chart and the rows of the heatmap) is
a `LayerSummary` plus the sample's PCA (`sample_projection`, skipped when a `pca` artifact exists),
each cached in memory and on disk (`diskcache`), so a second visit, also after a restart, reads no
shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from neuronmap.errors import NeuronMapError

from . import diskcache

STAT_COLUMNS = ("neuron", "mean", "std", "min", "max", "mean_abs", "sparsity", "skewness", "kurtosis")


@dataclass
class Projection:
    """Per-row 2-D/3-D coordinates of a layer with each row's layer row index and sample id."""

    coords: np.ndarray
    rows: np.ndarray
    sample_ids: np.ndarray
    method: str
    source: str
    explained: list[float] | None = None


HEAT_ROWS = 60
HEAT_NEURONS = 24


@dataclass
class LayerSummary:
    """What the Layer explorer derives from a layer's sample besides the projection, in one read of it.

    stats : per-neuron statistics of the sample (`STAT_COLUMNS`)
    values : at most `viz.MAX_POINTS` activation values (seeded) for the distribution chart
    heat_x, heat_ids, top : `HEAT_ROWS` seeded rows of the sample (all features) with their sample ids,
        and the `HEAT_NEURONS` neurons of highest mean |x|, for the heatmap
    n_rows, n_sample : rows of the layer, rows in the sample
    """

    stats: pd.DataFrame
    values: np.ndarray
    heat_x: np.ndarray
    heat_ids: np.ndarray
    top: np.ndarray
    n_rows: int
    n_sample: int


def summarize(x: np.ndarray, sample_ids: np.ndarray, n_rows: int) -> dict[str, np.ndarray]:
    """The arrays of a `LayerSummary` of the sample `x` (n_sample, n_features) (what the disk cache holds)."""
    from neuronmap.viz import MAX_POINTS, decimate

    from .reduce import sample_stats

    stats = sample_stats(x)
    flat = x.reshape(-1)
    heat = decimate(len(x), HEAT_ROWS, None, 0)
    top = np.argsort(-stats["mean_abs"].to_numpy(), kind="stable")[:HEAT_NEURONS]
    return {**{f"stat_{c}": stats[c].to_numpy() for c in stats.columns},
            "values": flat[decimate(flat.size, MAX_POINTS, None, 0)], "heat_x": x[heat], "heat_ids": sample_ids[heat],
            "top": top.astype(np.int64), "n_rows": np.asarray(n_rows, dtype=np.int64),
            "n_sample": np.asarray(len(x), dtype=np.int64)}


def _from_sample(repo, run_id: str, layer: str, what: str, compute) -> dict[str, np.ndarray]:
    """`compute(sample)` for the layer's sample, through memory and the run's disk cache.

    The keys hold the layer's shard digest (`diskcache.run_digest`), so a changed run misses both.
    """
    from .data import SAMPLE_ROWS

    run = repo.run(run_id)
    digest = diskcache.run_digest(run, [layer])

    def load() -> dict[str, np.ndarray]:
        key = [what, layer, SAMPLE_ROWS, 0, digest]
        return diskcache.cached(run.path, f"{what}/{layer}", key,
                                lambda: compute(repo.layer_sample(run_id, layer, max_rows=SAMPLE_ROWS)))

    return repo.derived((str(run.path), digest, layer, what), load)


def summary(repo, run_id: str, layer: str) -> LayerSummary:
    """The layer's `LayerSummary` from memory, else from the run's disk cache, else from a sample read."""
    arrays = _from_sample(repo, run_id, layer, "summary",
                          lambda sample: summarize(sample.x, sample.sample_ids, sample.n_rows))
    stats = pd.DataFrame({c: arrays[f"stat_{c}"] for c in STAT_COLUMNS if f"stat_{c}" in arrays})
    return LayerSummary(stats, arrays["values"], arrays["heat_x"], arrays["heat_ids"], arrays["top"],
                        int(arrays["n_rows"]), int(arrays["n_sample"]))


def sample_projection(repo, run_id: str, layer: str) -> Projection | None:
    """PCA of the layer's sample (`reduce.sample_pca`), cached like `summary`; None below 2 components."""
    from .reduce import sample_pca

    def compute(sample) -> dict[str, np.ndarray]:
        coords, explained = sample_pca(sample.x, k=3)
        return {"coords": coords, "rows": sample.rows, "sample_ids": sample.sample_ids,
                "explained": np.asarray(explained if explained is not None else [], float),
                "n_rows": np.asarray(sample.n_rows, dtype=np.int64)}

    arrays = _from_sample(repo, run_id, layer, "pca", compute)
    if arrays["coords"].shape[1] < 2:
        return None
    n, total = len(arrays["rows"]), int(arrays["n_rows"])
    return Projection(arrays["coords"], arrays["rows"], arrays["sample_ids"], "pca", sample_caption(n, total),
                      arrays["explained"].tolist() or None)


def sample_caption(n: int, total: int) -> str:
    """Where sample-based numbers come from (the sample is the whole layer up to `data.SAMPLE_ROWS` rows)."""
    return f"computed on a seeded sample of {n:,} of {total:,} rows"


def stale_note(repo, run_id: str, analysis: str, layer: str) -> str:
    """"; artifact X was computed on an earlier state of the run ..." when the newest `analysis` artifact
    of the layer is not current (so its numbers are not shown), else "".

    Says so instead of silently showing sample numbers next to an artifact the run page lists."""
    artifact = repo.newest(run_id, analysis, layer)
    if artifact is None or repo.current(run_id, artifact) is not False:
        return ""
    run = artifact.result.get("run") or {}
    rows = sorted({doc.get("rows") for doc in artifact.result["units"].values() if doc.get("rows") is not None})
    held = f"{', '.join(f'{r:,}' for r in rows)} rows, " if rows else ""
    return (f"; artifact {artifact.id} was computed on an earlier state of the run ({held}status "
            f"{run.get('status', '?')}) and is not shown: re-run the analysis")


def _key(repo, run_id: str, layer: str, what: str) -> tuple:
    run = repo.run(run_id)
    analyses = run.path / "analyses"
    stamp = analyses.stat().st_mtime_ns if analyses.is_dir() else 0
    return (str(run.path), run.manifest.updated, stamp, layer, what)


def neuron_stats(repo, run_id: str, layer: str) -> tuple[pd.DataFrame, str]:
    """Per-neuron statistics (one row per neuron) and where they come from."""

    def compute():
        artifact = repo.newest(run_id, "stats", layer, current=True)
        if artifact is not None:
            frame = artifact.table("neurons")
            frame = frame[frame["layer"] == layer]
            return frame[[c for c in STAT_COLUMNS if c in frame.columns]].reset_index(drop=True), \
                f"exact, from artifact {artifact.id}"
        found = summary(repo, run_id, layer)
        return found.stats, (f"estimated on a seeded sample of {found.n_sample:,} of {found.n_rows:,} rows; run the "
                             "stats analysis for exact values" + stale_note(repo, run_id, "stats", layer))

    return repo.derived(_key(repo, run_id, layer, "stats"), compute)


def projection(repo, run_id: str, layer: str, method: str = "pca", dims: int = 2) -> Projection | None:
    """PCA (artifact, else computed on the sample) or t-SNE (artifact only; None without one).

    A PCA artifact with fewer than `dims` coordinates (the default ``project=2`` for a 3-D view) gives
    way to the sample's PCA, which keeps 3; a t-SNE artifact is returned as it is (the caller says
    when it has too few dimensions).
    """

    def from_table(artifact, table: str, prefix: str, name: str) -> Projection | None:
        frame = artifact.table(table)
        frame = frame[frame["layer"] == layer]
        columns = [c for c in frame.columns if str(c).startswith(prefix) and str(c)[len(prefix):].isdigit()]
        if len(columns) < 2:
            return None
        explained = None
        if name == "pca":
            ratio = artifact.arrays.get(f"{layer}/explained_variance_ratio")
            explained = None if ratio is None else ratio.tolist()
        return Projection(frame[columns].to_numpy(np.float64), frame["row"].to_numpy(np.int64),
                          frame["sample_id"].to_numpy(np.int64), name, f"artifact {artifact.id}", explained)

    def compute():
        if method == "tsne":
            artifact = repo.newest(run_id, "tsne", layer, current=True)
            return None if artifact is None else from_table(artifact, "embedding", "tsne", "tsne")
        artifact = repo.newest(run_id, "pca", layer, current=True)
        if artifact is not None and "projection" in artifact.tables:
            found = from_table(artifact, "projection", "pc", "pca")
            if found is not None and found.coords.shape[1] >= dims:
                return found
            note = "" if found is None else f" (artifact {artifact.id} stores {found.coords.shape[1]} coordinates)"
        else:
            note = stale_note(repo, run_id, "pca", layer)
        found = sample_projection(repo, run_id, layer)
        if found is not None and note:
            found.source += note
        return found

    return repo.derived(_key(repo, run_id, layer, f"projection-{method}-{dims if method == 'pca' else ''}"), compute)


def clusters(repo, run_id: str, layer: str) -> tuple[dict[int, int], str] | None:
    """layer row -> k-means cluster, from the newest kmeans artifact of the layer (None without one)."""

    def compute():
        artifact = repo.newest(run_id, "kmeans", layer, current=True)
        if artifact is None or "assignments" not in artifact.tables:
            return None
        frame = artifact.table("assignments")
        frame = frame[frame["layer"] == layer]
        return dict(zip(frame["row"].tolist(), frame["cluster"].tolist())), artifact.id

    return repo.derived(_key(repo, run_id, layer, "clusters"), compute)


def colour(repo, run_id: str, layer: str, by: str | None, proj: Projection) -> tuple[np.ndarray | None, str | None]:
    """Colour values for each projected row: a prompts label column or "cluster"."""
    if not by:
        return None, None
    if by == "cluster":
        found = clusters(repo, run_id, layer)
        if found is None:
            return None, None
        mapping, _ = found
        return np.asarray([mapping.get(int(r), "n/a") for r in proj.rows], dtype=object), "cluster"
    prompts = repo.prompts(run_id)
    if by not in prompts.columns:
        return None, None
    mapping = dict(zip(prompts["sample_id"].tolist(), prompts[by].tolist()))
    return np.asarray([mapping.get(int(s)) for s in proj.sample_ids], dtype=object), by


def texts(repo, run_id: str, sample_ids: np.ndarray, tokens: list[str] | None = None) -> list[str]:
    """Hover text per point: `#sample_id: prompt` (`#sample_id · token 3 ' Paris': prompt` with `tokens`),
    or the id alone when prompts.parquet cannot be read (the activations can still be shown; the page
    says why the texts are missing)."""
    marks = [f" · {t}" for t in tokens] if tokens is not None else [""] * len(sample_ids)
    try:
        prompts = repo.prompts(run_id)
    except NeuronMapError:
        return [f"#{int(s)}{m}" for s, m in zip(sample_ids, marks)]
    lookup = dict(zip(prompts["sample_id"].tolist(), prompts["text"].tolist()))
    return [f"#{int(s)}{m}: {lookup.get(int(s), '')}" for s, m in zip(sample_ids, marks)]


def token_labels(repo, run_id: str, layer: str, rows: np.ndarray, sample_ids: np.ndarray) -> list[str] | None:
    """`token 3 ' Paris'` for each row of a per-token layer (None for a per-prompt layer): the row's position
    in its prompt and the token there, from the run's tokenizer with the extraction's truncation.

    Why: on a per-token run every point is one token, and a prompt alone does not say which. Without
    the tokenizer (not loadable offline) or the prompt texts, the position alone is given.
    """
    run = repo.run(run_id)
    if not run.layer_info(layer).per_token:
        return None
    rows = np.asarray(rows, dtype=np.int64)
    from .data import _mtime

    key = (str(run.path), _mtime(run.path / "manifest.json"), layer, "token-labels", hash(rows.tobytes()))
    return repo.derived(key, lambda: _token_labels(repo, run, run_id, layer, rows, np.asarray(sample_ids)))


def _token_labels(repo, run, run_id: str, layer: str, rows: np.ndarray, sample_ids: np.ndarray) -> list[str]:
    from neuronmap.extraction import tokenize_prompts

    from .attention import tokenizer_for
    from .data import read_token_index

    positions = read_token_index(run, layer, rows)
    plain = [f"token {int(p)}" for p in positions]
    try:
        tokenizer = tokenizer_for(run)
        prompts = repo.prompts(run_id)
    except NeuronMapError:
        return plain
    lookup = dict(zip(prompts["sample_id"].tolist(), prompts["text"].tolist()))
    known = [int(s) for s in np.unique(sample_ids) if isinstance(lookup.get(int(s)), str) and lookup[int(s)].strip()]
    if not known:
        return plain
    ids = tokenize_prompts(tokenizer, [lookup[s] for s in known], int(run.manifest.max_length or 512)).ids
    prompt_ids = {s: ids[i] for i, s in enumerate(known)}
    pieces: dict[int, str] = {}
    labels = []
    for label, sample, position in zip(plain, sample_ids.tolist(), positions.tolist()):
        seq = prompt_ids.get(int(sample))
        if seq is None or position >= len(seq):
            labels.append(label)
            continue
        token = int(seq[position])
        if token not in pieces:
            pieces[token] = tokenizer.decode([token])
        labels.append(f"{label} {pieces[token]!r}")
    return labels
