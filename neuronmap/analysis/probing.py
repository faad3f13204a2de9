"""Linear probes: how linearly decodable a label is from one layer, and how much of that is the probe's doing.

A probe is a linear model (logistic regression for classes, ridge regression for continuous labels),
standardised inputs, scored by k-fold cross-validation (stratified and shuffled for classes). A high
accuracy alone does not show that the layer *encodes* the label: an expressive probe can memorise. The
control task of Hewitt & Liang (2019, "Designing and Interpreting Probes with Control Tasks") maps every
*type* (a word, or here by default each sample) to a random label drawn so that the label distribution
over types is unchanged; a probe that scores well on it memorises. Selectivity = accuracy - control
accuracy is what the layer adds.

Rows that belong together (the tokens of one prompt, given as `groups`) never straddle a fold: tokens of a
prompt share its label and much of its context, so a probe tested on tokens whose neighbours it was trained
on scores its memory of the prompt, not the layer (on a per-token MiniLM run: 0.73 row-split against 0.54
prompt-split, with the control task at 0.33 against chance 0.10). Such rows are split with
StratifiedGroupKFold (GroupKFold for continuous labels, or when a class has fewer groups than folds). When
every group is a single row (pooled runs) the folds are exactly the ungrouped ones.

Pure functions on arrays, no I/O; `neuronmap.analysis.builtin.probing` registers the `probe` analysis.

Example
-------
>>> result = probe(x, y, n_splits=5, seed=0)                       # doctest: +SKIP
>>> result.accuracy_mean, result.control_mean, result.selectivity   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import pandas as pd

from ..errors import ConfigError

Task = Literal["auto", "classification", "regression"]
TASKS = ("auto", "classification", "regression")


def infer_task(y: np.ndarray) -> str:
    """"regression" for float labels that are not all whole numbers, else "classification"."""
    y = np.asarray(y)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (np.mod(y, 1) == 0)):
        return "regression"
    return "classification"


def make_probe(task: str, C: float = 1.0, alpha: float = 1.0, max_iter: int = 1000):
    """The unfitted probe: StandardScaler + LogisticRegression(C) for classes, + Ridge(alpha) otherwise."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "classification":
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    if task == "regression":
        return make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    raise ConfigError(f"task={task!r} must be one of classification, regression")


def make_folds(task: str, n_splits: int, seed: int, grouped: bool = False):
    """StratifiedKFold (classes) or KFold (continuous), shuffled with `seed`.

    grouped=True: the group-aware splitters, StratifiedGroupKFold for "classification" and GroupKFold
    (shuffled where the installed sklearn can, >= 1.6) otherwise; pass `groups=` to their `split`.
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if not grouped:
        cls = StratifiedKFold if task == "classification" else KFold
        return cls(n_splits=n_splits, shuffle=True, random_state=seed)
    if task == "classification":
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        return GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    except TypeError:  # sklearn < 1.6: GroupKFold has no shuffle; its size-balanced split is deterministic
        return GroupKFold(n_splits=n_splits)


def _groups_per_class(y: np.ndarray, groups: np.ndarray) -> int:
    """The fewest distinct groups any class has (how many folds a stratified group split can fill)."""
    frame = pd.DataFrame({"y": y.astype(str) if y.dtype == object else y, "g": groups})
    return int(frame.groupby("y")["g"].nunique().min())


def _grouped_folds(task: str, y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, warn: bool = False):
    """Group-aware folds for labels `y`: stratified when every class spans >= n_splits groups."""
    if task == "classification":
        fewest = _groups_per_class(y, groups)
        if fewest >= n_splits:
            return make_folds("classification", n_splits, seed, grouped=True)
        if warn:
            warnings.warn(f"a class spans only {fewest} prompts, fewer than n_splits={n_splits}: folds are grouped "
                          "by prompt but not stratified (GroupKFold), so some test folds lack that class",
                          UserWarning, stacklevel=3)
    return make_folds("regression", n_splits, seed, grouped=True)


def _validate(x: np.ndarray, y: np.ndarray, task: str, n_splits: int) -> tuple[np.ndarray, np.ndarray, str]:
    x = np.asarray(x)
    x = x.reshape(len(x), -1)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError(f"labels must be one column of shape (n_samples,); got shape {y.shape}")
    if len(y) != len(x):
        raise ConfigError(f"X has {len(x)} samples but labels has {len(y)}: a probe pairs each sample with its label")
    if task not in TASKS:
        raise ConfigError(f"task={task!r} must be one of {', '.join(TASKS)}")
    if pd.isna(pd.Series(y.astype(object) if y.dtype.kind not in "fiub" else y)).any():
        raise ConfigError("labels has missing values; drop those samples or fill the labels first")
    task = infer_task(y) if task == "auto" else task
    if task == "classification":
        classes, counts = np.unique(y.astype(str) if y.dtype == object else y, return_counts=True)
        if len(classes) < 2:
            raise ConfigError(f"labels have a single class ({str(classes[0])!r}) in {len(y)} rows: a probe needs "
                              "at least 2 classes; pick another --labels column or more samples")
        if counts.min() < n_splits:
            smallest = str(classes[counts.argmin()])
            raise ConfigError(f"the smallest class ({smallest!r}) has {int(counts.min())} rows, fewer "
                              f"than n_splits={n_splits}: lower n_splits (>= 2) or add samples of that class")
    else:
        if len(y) < n_splits:
            raise ConfigError(f"n_splits={n_splits} must be <= n_samples={len(y)}")
        if np.ptp(y.astype(np.float64)) == 0:
            raise ConfigError(f"labels are constant ({y[0]!r}): a probe needs labels that vary")
    return x, y, task


def control_labels(y: np.ndarray, types: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Control task of Hewitt & Liang (2019): every type gets a random label, the label distribution kept.

    Parameters
    ----------
    y : ndarray of shape (n_samples,)
        The real labels.
    types : ndarray of shape (n_samples,), optional
        The type of each row (a word, a sample id). Rows of one type share their control label, so a
        probe can only solve the control task by memorising types. Default: every row its own type.
    seed : int

    Returns
    -------
    ndarray of shape (n_samples,)
        Control labels: the types' labels (each type's first row) permuted across types, so the
        distribution of labels over types is exactly the real one.
    """
    y = np.asarray(y)
    if types is None:
        types = np.arange(len(y))
    types = np.asarray(types)
    if types.shape != y.shape:
        raise ConfigError(f"types has shape {types.shape} but labels {y.shape}: give one type per row")
    _, first, inverse = np.unique(types, return_index=True, return_inverse=True)
    type_labels = y[first]
    shuffled = type_labels[np.random.default_rng(seed).permutation(len(type_labels))]
    return shuffled[inverse.reshape(-1)]


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated scores of one layer's probe and its control task.

    `scores` / `control_scores`: ndarray of shape (n_splits,), accuracy (classes) or R^2 (continuous).
    """

    task: str
    scores: np.ndarray
    control_scores: np.ndarray
    n_samples: int
    n_classes: int | None
    n_groups: int | None = None
    """Distinct groups the folds were split by; None when rows were split one by one."""

    @property
    def accuracy_mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def accuracy_std(self) -> float:
        return float(np.std(self.scores))

    @property
    def control_mean(self) -> float:
        return float(np.mean(self.control_scores))

    @property
    def control_std(self) -> float:
        return float(np.std(self.control_scores))

    @property
    def selectivity(self) -> float:
        """accuracy - control accuracy (Hewitt & Liang's selectivity)."""
        return self.accuracy_mean - self.control_mean


def probe(x: np.ndarray, y: np.ndarray, task: Task = "auto", n_splits: int = 5, C: float = 1.0,
          alpha: float = 1.0, max_iter: int = 1000, types: np.ndarray | None = None, seed: int = 0,
          groups: np.ndarray | None = None) -> ProbeResult:
    """Cross-validated linear probe of `y` from `x`, and the same probe on the control task.

    Parameters
    ----------
    x : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
        Class labels (any hashable values) or continuous targets.
    task : "auto" | "classification" | "regression"
        "auto": regression for non-integer floats, classification otherwise.
    n_splits : int
        Folds (stratified for classes); every class needs at least n_splits rows.
    C, alpha : float
        Inverse L2 strength of the logistic probe; L2 strength of the ridge probe.
    types : ndarray of shape (n_samples,), optional
        Type of each row for the control task (see `control_labels`).
    seed : int
        Seeds the fold shuffle and the control labels.
    groups : ndarray of shape (n_samples,), optional
        Group of each row (the prompt of a token). When some group holds several rows, folds keep each
        group whole, for the probe and its control task (see the module docstring); when every row is
        its own group (or None), folds split rows as before.

    Returns
    -------
    ProbeResult
        Scores are accuracy for classes and R^2 for continuous labels (sklearn's default scorers);
        `n_groups` says whether (and by how many groups) the folds were grouped.
    """
    from sklearn.model_selection import cross_val_score

    if n_splits < 2:
        raise ConfigError(f"n_splits={n_splits} must be >= 2")
    x, y, task = _validate(x, y, task, n_splits)
    control = control_labels(y, types, seed)
    estimator = make_probe(task, C=C, alpha=alpha, max_iter=max_iter)
    n_classes = int(len(np.unique(y))) if task == "classification" else None
    grouped = False
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != y.shape:
            raise ConfigError(f"groups has shape {groups.shape} but labels {y.shape}: give one group per row")
        n_groups = int(len(np.unique(groups)))
        grouped = n_groups < len(groups)
    if grouped:
        if n_groups < n_splits:
            raise ConfigError(f"the rows come from {n_groups} prompts, fewer than n_splits={n_splits}; folds keep "
                              "a prompt's tokens together: lower n_splits (>= 2) or add prompts")
        folds = _grouped_folds(task, y, groups, n_splits, seed, warn=True)
        scores = cross_val_score(estimator, x, y, cv=folds, groups=groups)
        folds_control = _grouped_folds(task, control, groups, n_splits, seed)
        control_scores = cross_val_score(estimator, x, control, cv=folds_control, groups=groups)
        return ProbeResult(task=task, scores=np.asarray(scores, dtype=np.float64),
                           control_scores=np.asarray(control_scores, dtype=np.float64), n_samples=len(y),
                           n_classes=n_classes, n_groups=n_groups)
    folds = make_folds(task, n_splits, seed)
    scores = cross_val_score(estimator, x, y, cv=folds)
    if task == "classification" and np.unique(control, return_counts=True)[1].min() < n_splits:
        folds_control = make_folds("regression", n_splits, seed)  # a type-level permutation can starve a class
    else:
        folds_control = folds
    control_scores = cross_val_score(estimator, x, control, cv=folds_control)
    return ProbeResult(task=task, scores=np.asarray(scores, dtype=np.float64),
                       control_scores=np.asarray(control_scores, dtype=np.float64), n_samples=len(y),
                       n_classes=n_classes)


CURVE_COLUMNS = ["layer", "accuracy_mean", "accuracy_std", "control_accuracy", "selectivity"]


def accuracy_by_layer(source: Any) -> pd.DataFrame:
    """The accuracy-by-layer curve of a `probe` analysis, one row per layer.

    Parameters
    ----------
    source : Artifact, dict or mapping
        What `analyze(run, "probe", labels=...)` returns (an Artifact); its result.json as a dict (also what
        ``neuronmap analyze RUN probe --json`` prints); that dict's ``"units"`` ({layer: {"metrics": {...}}});
        or per-layer metrics ({layer: {"accuracy_mean": ..., ...}}).

    Returns
    -------
    DataFrame of shape (n_layers, 5)
        Columns layer, accuracy_mean, accuracy_std, control_accuracy, selectivity, in the order given (for an
        artifact: the run's layer order). Accuracy is R^2 for continuous labels (metric ``score``).

    Example
    -------
    >>> accuracy_by_layer(analyze("runs/sentiment", "probe", labels="sentiment"))   # doctest: +SKIP
    """
    result = getattr(source, "result", source)  # an Artifact holds result.json as .result
    if isinstance(result, Mapping) and isinstance(result.get("units"), Mapping) and "analysis" in result:
        if result["analysis"] != "probe":
            raise ConfigError(f"accuracy_by_layer reads a 'probe' analysis, not {result['analysis']!r}: run "
                              "analyze(run, 'probe', labels=COLUMN) and pass its artifact")
        units = result["units"]
    elif isinstance(result, Mapping):
        units = result
    else:
        raise ConfigError(f"accuracy_by_layer takes a probe artifact (analyze(run, 'probe', labels=...)), its "
                          f"result dict, or {{layer: metrics}}; got {type(source).__name__}: pass the artifact itself")
    rows = []
    for layer, doc in units.items():
        metrics = doc["metrics"] if isinstance(doc, Mapping) and "metrics" in doc else doc
        missing = [c for c in CURVE_COLUMNS[1:] if not isinstance(metrics, Mapping) or c not in metrics]
        if missing:
            raise ConfigError(f"layer {layer!r} has no probe metric {', '.join(missing)}: pass a 'probe' artifact, "
                              "its result dict, or {layer: metrics} of one")
        rows.append({"layer": layer, **{c: metrics[c] for c in CURVE_COLUMNS[1:]}})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)
