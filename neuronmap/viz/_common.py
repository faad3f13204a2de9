"""Helpers shared by the figure builders: point decimation, hover text, categorical colours.

Nothing here reads files or knows about Dash; every function takes arrays and returns arrays.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np

MAX_POINTS = 20_000
"""Scatter plots never draw more points than this (browsers slow down past a few tens of thousands)."""

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173",
           "#3182bd", "#e6550d", "#31a354", "#756bb1")


def as_category_strings(values: Sequence | np.ndarray) -> np.ndarray:
    """Labels as a str ndarray (None/NaN become "nan"), so that mixed types sort and compare."""
    array = np.asarray(values, dtype=object)
    return np.array(["nan" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in array],
                    dtype=str) if array.size else np.empty(0, dtype=str)


def category_order(labels: np.ndarray) -> list[str]:
    """Unique labels, numbers in numeric order ("2" before "10"), then the rest alphabetically."""
    unique = list(dict.fromkeys(np.unique(labels).tolist()))

    def key(value: str):
        try:
            return (0, float(value), "")
        except ValueError:
            return (1, 0.0, value)

    return sorted(unique, key=key)


def decimate(n: int, max_points: int = MAX_POINTS, labels: Sequence | np.ndarray | None = None,
             seed: int = 0) -> np.ndarray:
    """Sorted positions of at most `max_points` of `n` points: a seeded sample that keeps label balance.

    Parameters
    ----------
    n : int
        Number of points.
    max_points : int
        Cap; all positions are returned when ``n <= max_points``.
    labels : array-like of shape (n,), optional
        With labels the sample is stratified: each label keeps its share of the points (largest
        remainder rounding), and every label keeps at least one point when ``max_points`` allows.
    seed : int
        Same inputs and seed, same positions.

    Returns
    -------
    ndarray of shape (min(n, max_points),), int64, sorted
    """
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 1:
        raise ValueError(f"max_points={max_points!r} must be an integer >= 1")
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n, int(max_points), replace=False)).astype(np.int64)
    labels = as_category_strings(labels)
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but there are n={n} points")
    _, codes = np.unique(labels, return_inverse=True)
    counts = np.bincount(codes)
    exact = counts * (max_points / n)
    quota = np.floor(exact).astype(np.int64)
    remainder = int(max_points - quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:remainder]] += 1
    if len(counts) <= max_points:
        for empty in np.flatnonzero(quota == 0):
            quota[int(np.argmax(quota))] -= 1
            quota[empty] = 1
    chosen = [rng.choice(np.flatnonzero(codes == code), int(q), replace=False) for code, q in enumerate(quota) if q]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def hover_text(texts: Sequence | np.ndarray, width: int = 60, limit: int = 240) -> list[str]:
    """Prompt texts made safe for plotly hover labels: HTML-escaped, cut at `limit`, wrapped at `width`."""
    out = []
    for text in texts:
        text = " ".join(str(text).split())
        if len(text) > limit:
            text = text[: limit - 1] + "…"
        lines, line = [], ""
        for word in text.split(" "):
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        out.append("<br>".join(html.escape(part) for part in lines))
    return out


def check_2d(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {array.shape}")
    return array
