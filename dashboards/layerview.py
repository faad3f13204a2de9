"""What the Layer explorer shows, computed from the run's artifacts when there are some, else from a sample.

Exact numbers come from artifacts (`stats`, `pca`, `tsne`, `kmeans` of that layer, newest first); without
them, per-neuron statistics and a PCA projection are computed on the layer's seeded sample of at
most `data.SAMPLE_ROWS` rows and labelled as such. Every result is cached by the repository.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

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


def _key(repo, run_id: str, layer: str, what: str) -> tuple:
    run = repo.run(run_id)
    analyses = run.path / "analyses"
    stamp = analyses.stat().st_mtime_ns if analyses.is_dir() else 0
    return (str(run.path), run.manifest.updated, stamp, layer, what)


def neuron_stats(repo, run_id: str, layer: str) -> tuple[pd.DataFrame, str]:
    """Per-neuron statistics (one row per neuron) and where they come from."""

    def compute():
        artifact = repo.newest(run_id, "stats", layer)
        if artifact is not None:
            frame = artifact.table("neurons")
            frame = frame[frame["layer"] == layer]
            return frame[[c for c in STAT_COLUMNS if c in frame.columns]].reset_index(drop=True), \
                f"exact, from artifact {artifact.id}"
        sample = repo.layer_sample(run_id, layer)
        x = sample.x.astype(np.float64)
        frame = pd.DataFrame({"neuron": np.arange(x.shape[1]), "mean": x.mean(0), "std": x.std(0), "min": x.min(0),
                              "max": x.max(0), "mean_abs": np.abs(x).mean(0), "sparsity": (np.abs(x) < 1e-6).mean(0)})
        return frame, (f"estimated on a seeded sample of {len(x):,} of {sample.n_rows:,} rows; "
                       "run the stats analysis for exact values")

    return repo.derived(_key(repo, run_id, layer, "stats"), compute)


def projection(repo, run_id: str, layer: str, method: str = "pca") -> Projection | None:
    """PCA (artifact, else computed on the sample) or t-SNE (artifact only; None without one)."""

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
            artifact = repo.newest(run_id, "tsne", layer)
            return None if artifact is None else from_table(artifact, "embedding", "tsne", "tsne")
        artifact = repo.newest(run_id, "pca", layer)
        if artifact is not None and "projection" in artifact.tables:
            found = from_table(artifact, "projection", "pc", "pca")
            if found is not None:
                return found
        sample = repo.layer_sample(run_id, layer)
        x = sample.x.astype(np.float64)
        x = x - x.mean(axis=0)
        k = min(3, x.shape[0], x.shape[1])
        if k < 2:
            return None
        _, s, vt = np.linalg.svd(x, full_matrices=False) if x.shape[1] <= 256 else _randomized(x, k)
        coords = x @ vt[:k].T
        total = float((x ** 2).sum())
        explained = ((s[:k] ** 2) / total).tolist() if total > 0 else None
        return Projection(coords, sample.rows, sample.sample_ids, "pca",
                          f"computed on a seeded sample of {len(x):,} of {sample.n_rows:,} rows", explained)

    return repo.derived(_key(repo, run_id, layer, f"projection-{method}"), compute)


def _randomized(x: np.ndarray, k: int):
    from sklearn.utils.extmath import randomized_svd

    u, s, vt = randomized_svd(x, n_components=k, random_state=0)
    return u, s, vt


def clusters(repo, run_id: str, layer: str) -> tuple[dict[int, int], str] | None:
    """layer row -> k-means cluster, from the newest kmeans artifact of the layer (None without one)."""

    def compute():
        artifact = repo.newest(run_id, "kmeans", layer)
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


def texts(repo, run_id: str, sample_ids: np.ndarray) -> list[str]:
    prompts = repo.prompts(run_id)
    lookup = dict(zip(prompts["sample_id"].tolist(), prompts["text"].tolist()))
    return [f"#{int(s)}: {lookup.get(int(s), '')}" for s in sample_ids]
