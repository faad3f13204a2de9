"""Concept activation vectors (Kim et al. 2018, "Interpretability Beyond Feature Attribution: TCAV").

A CAV is the direction in one layer's activation space that separates examples of a concept from
random examples: the normal of a linear classifier's decision boundary, pointing towards the concept,
scaled to unit length. How well the classifier separates held-out examples says whether the layer
represents the concept linearly at all; a CAV of a concept the layer does not represent is noise.

The classifier is fitted on standardised activations (so the solver converges on layers with a few
huge dimensions) and its weights are mapped back to activation space (``w / scale``): the CAV is the
normal of the same boundary in the coordinates the model uses, which is what a directional derivative
needs. Near-dead features are left out of the fit and get weight 0 (`dead_features`): dividing by a
spread of ~1e-32 would otherwise blow their weight up to ~1e30 and the unit CAV would point along a
neuron that carries no signal at all.

A *random CAV* separates two disjoint random subsets of the random examples; its TCAV scores are the
null distribution of the significance test (`neuronmap.concepts.tcav`).

Pure functions on arrays (numpy, scikit-learn), no I/O.

Example
-------
>>> cav = fit_cav(concept_rows, random_rows, seed=0)              # doctest: +SKIP
>>> cav.vector.shape, cav.accuracy                                # doctest: +SKIP
((768,), 0.97)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from ..errors import ConfigError

Classifier = Literal["logistic", "svm"]
CLASSIFIERS = ("logistic", "svm")


@dataclass(frozen=True)
class CAV:
    """One concept activation vector and how well its classifier separated held-out examples.

    vector : ndarray of shape (n_features,), unit norm, pointing from random towards concept examples
    accuracy : held-out accuracy of the classifier (balanced classes: chance is 0.5)
    intercept : decision-function intercept in activation space (``x @ raw_vector + intercept``)
    raw_norm : norm of the weight vector before normalising (a large norm: a sharp boundary)
    n_dead : features left out of the fit as near-constant (`dead_features`); their weight is 0
    """

    vector: np.ndarray
    accuracy: float
    intercept: float
    raw_norm: float
    n_concept: int
    n_random: int
    n_test: int
    classifier: str
    n_dead: int = 0


def _check_examples(concept: np.ndarray, random: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    concept = np.asarray(concept, dtype=np.float64)
    random = np.asarray(random, dtype=np.float64)
    concept = concept.reshape(len(concept), -1)
    random = random.reshape(len(random), -1)
    if concept.shape[1] != random.shape[1]:
        raise ConfigError(f"concept examples have {concept.shape[1]} features but random examples {random.shape[1]}: "
                          "both must come from the same layer")
    for name, rows in (("concept", concept), ("random", random)):
        if len(rows) < 2:
            raise ConfigError(f"{len(rows)} {name} example(s): a CAV needs at least 2 of each side (one to train, one "
                              "to test); add examples")
        if not np.isfinite(rows).all():
            raise ConfigError(f"{name} examples hold NaN or infinite activations; drop those rows")
    return concept, random


def _holdout(n: int, test_fraction: float, rng: np.random.Generator,
             groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of one class: a seeded permutation, at least one row on each side.

    With `groups` (a prompt's id per row, as on per-token runs) whole groups are held out, so no
    prompt has tokens on both sides: held-out accuracy is then on prompts the classifier never saw.
    Groups of one row each (pooled runs) change nothing, not even the random draw.
    """
    n_test = min(n - 1, max(1, int(round(test_fraction * n))))
    if groups is None or len(np.unique(groups)) == n:
        order = rng.permutation(n)
        return order[n_test:], order[:n_test]
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if len(names) < 2:
        raise ConfigError(f"all {n} rows of one side come from one prompt: holding out whole prompts needs at "
                          "least 2 prompts per side")
    order = rng.permutation(len(names))
    sizes = np.bincount(inverse, minlength=len(names))[order]
    # whole groups until the held-out rows reach the share, keeping at least one group for training
    cut = int(np.searchsorted(np.cumsum(sizes), n_test)) + 1
    test_groups = order[: min(cut, len(names) - 1)]
    test = np.isin(inverse, test_groups)
    return np.flatnonzero(~test), np.flatnonzero(test)


DEAD_RELATIVE_STD = 1e-6


def dead_features(rows: np.ndarray, relative: float = DEAD_RELATIVE_STD) -> np.ndarray:
    """Boolean mask of near-constant features: std <= `relative` x the largest feature std of `rows`.

    Why: StandardScaler only treats an exactly constant column as constant; a column of ~1e-32 values
    (a neuron a LayerNorm or ReLU has all but switched off) is scaled up to unit variance, the classifier
    may lean on its rounding noise, and mapping the weight back to activation space (``w / scale``)
    multiplies it by ~1e32, so the whole CAV points along that neuron. Relative to the largest spread,
    1e-6 is below float32 resolution (~1.2e-7 of a value), i.e. variation the stored activations cannot
    hold as signal. An all-constant layer has no dead feature by this rule (sklearn handles it).
    """
    std = np.asarray(rows, dtype=np.float64).std(axis=0)
    top = float(std.max()) if std.size else 0.0
    if not top > 0:
        return np.zeros(std.shape, dtype=bool)
    return std <= relative * top


def make_classifier(classifier: str, C: float, max_iter: int):
    """The unfitted linear classifier: StandardScaler + LogisticRegression or LinearSVC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier == "logistic":
        model = LogisticRegression(C=C, max_iter=max_iter, solver="liblinear")
    elif classifier == "svm":
        model = LinearSVC(C=C, max_iter=max_iter)
    else:
        raise ConfigError(f"classifier={classifier!r} must be one of {', '.join(CLASSIFIERS)}")
    return make_pipeline(StandardScaler(), model)


def fit_cav(concept: np.ndarray, random: np.ndarray, classifier: Classifier = "logistic", C: float = 0.1,
            test_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0,
            concept_groups: np.ndarray | None = None, random_groups: np.ndarray | None = None) -> CAV:
    """Fit a linear classifier concept (1) vs random (0) and return its normalised normal.

    Parameters
    ----------
    concept : ndarray of shape (n_concept, n_features)
    random : ndarray of shape (n_random, n_features)
    classifier : "logistic" | "svm"
    C : float
        Inverse L2 strength of the classifier. Strong regularisation (the default 0.1) keeps the normal
        close to the concept's mean difference; a weak one lets a nearly separable sample (few
        examples, many features) tilt it towards noise dimensions that happen to separate.
    test_fraction : float in (0, 1)
        Share of each side held out for the accuracy (at least one row per side).
    seed : int
        Seeds the hold-out split.
    concept_groups, random_groups : ndarray, optional
        The prompt (sample id) of each row: rows of one prompt are held out together (per-token runs).

    Features that are near-constant on the training rows (std <= 1e-6 x the largest feature std,
    `dead_features`) are excluded from the fit and get weight 0 in the CAV (counted in ``n_dead``).

    Returns
    -------
    CAV
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction!r} must be between 0 and 1 (exclusive)")
    if not C > 0:
        raise ConfigError(f"C={C!r} must be > 0")
    concept, random = _check_examples(concept, random)
    rng = np.random.default_rng(seed)
    c_train, c_test = _holdout(len(concept), test_fraction, rng, concept_groups)
    r_train, r_test = _holdout(len(random), test_fraction, rng, random_groups)
    x_train = np.concatenate([concept[c_train], random[r_train]])
    y_train = np.concatenate([np.ones(len(c_train)), np.zeros(len(r_train))])
    x_test = np.concatenate([concept[c_test], random[r_test]])
    y_test = np.concatenate([np.ones(len(c_test)), np.zeros(len(r_test))])
    if not np.asarray(x_train, dtype=np.float64).std(axis=0).any():
        raise ConfigError("every training example has the same activations here, so no direction separates the "
                          "concept from the random examples; with pooling first the first token is often one "
                          "special token in every prompt: pool with mean or last")
    keep = ~dead_features(x_train)
    model = make_classifier(classifier, C, max_iter)
    with warnings.catch_warnings():
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)  # a boundary that is not fully converged is still a CAV
        model.fit(x_train[:, keep], y_train)
    scaler, linear = model[0], model[-1]
    weights = np.zeros(concept.shape[1])
    weights[keep] = linear.coef_.reshape(-1) / scaler.scale_
    intercept = float(linear.intercept_.reshape(-1)[0] - weights[keep] @ scaler.mean_)
    norm = float(np.linalg.norm(weights))
    vector = weights / norm if norm > 0 else weights
    accuracy = float(np.mean(model.predict(x_test[:, keep]) == y_test))
    return CAV(vector=vector, accuracy=accuracy, intercept=intercept, raw_norm=norm, n_concept=len(concept),
               n_random=len(random), n_test=len(y_test), classifier=classifier, n_dead=int((~keep).sum()))


@dataclass(frozen=True)
class CAVRuns:
    """CAVs of one concept over several runs, and the random-vs-random CAVs of its null distribution.

    concept : list of CAV, one per run: ``size`` concept rows vs ``size`` random rows, drawn afresh per run
    null : list (one per pseudo-concept) of lists of CAV (one per run). A pseudo-concept is a fixed
        random subset of the random rows as large as the concept set; each of its runs draws ``size``
        of its rows vs ``size`` of the other random rows, exactly as the concept's runs do.
    size : examples per side in every run; set_size : rows of the concept set and of each pseudo-concept
    """

    concept: list[CAV]
    null: list[list[CAV]]
    size: int
    set_size: int

    @property
    def vectors(self) -> np.ndarray:
        """(n_runs, n_features) concept CAVs."""
        return np.stack([c.vector for c in self.concept])

    @property
    def null_vectors(self) -> np.ndarray:
        """(n_sets, n_runs, n_features) random-vs-random CAVs."""
        return np.stack([np.stack([c.vector for c in runs]) for runs in self.null])


def check_max_examples(value: int | None, name: str = "max_examples") -> int | None:
    """`value` when it is None (no cap) or an integer >= 2; else a ConfigError naming `name` (a CAV run needs
    at least 2 examples per side: one to fit on and one to hold out)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
        shown = f"{name} {value!r}" if name.startswith("--") else f"{name}={value!r}"
        raise ConfigError(f"{shown} must be an integer >= 2 (examples per side of each CAV run; a CAV needs at least 2 "
                          "per side), e.g. 500")
    return int(value)


def run_sizes(n_concept: int, n_random: int, max_examples: int | None, null_sets: int) -> tuple[int, int]:
    """(set_size, size): the concept set used (at most half the random rows when pseudo-concepts must be
    carved out of them) and the examples per side of each run (also at most `max_examples`)."""
    max_examples = check_max_examples(max_examples)
    set_size = min(n_concept, n_random // 2) if null_sets > 0 else n_concept
    size = min(set_size, n_random - set_size if null_sets > 0 else n_random, max_examples or set_size)
    if size < 2:
        raise ConfigError(f"{n_concept} concept and {n_random} random examples give {size} per side: CAVs need at least "
                          f"2 per side{' (pseudo-concepts take half of the random examples)' if null_sets else ''}; "
                          "add examples")
    return set_size, size


def cav_runs(concept: np.ndarray, random: np.ndarray, n_runs: int = 10, null_sets: int | None = None,
             max_examples: int | None = 500, classifier: Classifier = "logistic", C: float = 0.1,
             test_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0,
             progress: Callable[[int, int], None] | None = None) -> CAVRuns:
    """`n_runs` concept CAVs and, for each of `null_sets` (default `n_runs`) pseudo-concepts, `n_runs`
    random-vs-random CAVs built the same way (see `CAVRuns`).

    Why pseudo-concepts: the runs of one concept share its examples, so their scores vary less than
    scores of independent random CAVs, and comparing the two directly flags random example sets as
    concepts far more often than the nominal rate. Each pseudo-concept is processed exactly like the
    concept, so under "the concept examples are just random examples" the concept's mean score and the
    pseudo-concepts' mean scores are draws from one distribution (`neuronmap.concepts.tcav.significance`).
    Every draw is seeded by ``seed``, the set and the run index.
    """
    null_sets = n_runs if null_sets is None else null_sets
    if isinstance(n_runs, bool) or not isinstance(n_runs, (int, np.integer)) or n_runs < 1:
        raise ConfigError(f"n_runs={n_runs!r} must be an integer >= 1")
    concept, random = _check_examples(concept, random)
    set_size, size = run_sizes(len(concept), len(random), max_examples, null_sets)
    total, done = n_runs * (1 + null_sets), 0

    def runs(rows: np.ndarray, others: np.ndarray, key: int) -> list[CAV]:
        nonlocal done
        out = []
        for run in range(n_runs):
            rng = np.random.default_rng([seed, key, run])
            pick = np.sort(rng.choice(len(rows), size, replace=False))
            other = np.sort(rng.choice(len(others), size, replace=False))
            out.append(fit_cav(rows[pick], others[other], classifier, C, test_fraction, max_iter, seed=seed + run))
            done += 1
            if progress is not None:
                progress(done, total)
        return out

    rng = np.random.default_rng([seed, 0, 0])
    concept_set = concept if set_size == len(concept) else concept[np.sort(rng.choice(len(concept), set_size,
                                                                                        replace=False))]
    concept_cavs = runs(concept_set, random, 0)
    null = []
    for index in range(null_sets):
        order = np.random.default_rng([seed, index + 1, 1 << 20]).permutation(len(random))
        null.append(runs(random[np.sort(order[:set_size])], random[np.sort(order[set_size:])], index + 1))
    return CAVRuns(concept=concept_cavs, null=null, size=size, set_size=set_size)


def cosine_matrix(vectors: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities between vectors (a zero vector gives NaN in its row and column)."""
    v = np.asarray(vectors, dtype=np.float64)
    v = v.reshape(len(v), -1)
    norms = np.linalg.norm(v, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = v / norms[:, None]
    out = unit @ unit.T
    out[norms == 0, :] = np.nan
    out[:, norms == 0] = np.nan
    return np.clip(out, -1.0, 1.0)


def label_text(labels: np.ndarray, value: object, column: str = "labels", what: str = "concept") -> str:
    """The label of column `labels` that `value` names, as text: ``True`` for true, TRUE or True of a boolean
    column (labels compare as text; case is ignored when that leaves one match). ConfigError otherwise."""
    values = sorted({str(v) for v in np.asarray(labels, dtype=object)})
    shown = ", ".join(values[:12]) + (" ..." if len(values) > 12 else "")
    return _label_value(value, values, what, column, shown)


def split_by_label(labels: np.ndarray, concept: object, negative: object | None = None,
                   column: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """(concept positions, random positions) of a label column; labels compare as text.

    Random rows are every row whose label differs from `concept`, or those equal to `negative`;
    ``true``/``TRUE`` name a boolean column's ``True`` (`label_text`). A column with a single value,
    or a value it lacks, is a one-line ConfigError naming the values.
    """
    text = np.asarray([str(v) for v in np.asarray(labels, dtype=object)], dtype=object)
    values = sorted(set(text.tolist()))
    shown = ", ".join(values[:12]) + (" ..." if len(values) > 12 else "")
    if len(values) < 2:
        raise ConfigError(f"label column {column!r} has a single value ({values[0] if values else 'no rows'!s}): a CAV "
                          "needs concept rows and other rows; pick another --labels column")
    concept = _label_value(concept, values, "concept", column, shown)
    negative = _label_value(negative, values, "negative", column, shown)
    if negative is not None and str(negative) == str(concept):
        raise ConfigError(f"concept and negative are both {str(concept)!r}: give two different values")
    concept_rows = np.flatnonzero(text == str(concept))
    random_rows = np.flatnonzero(text == str(negative)) if negative is not None else np.flatnonzero(text != str(concept))
    return concept_rows, random_rows


def _label_value(value: object, values: list[str], what: str, column: str, shown: str) -> str | None:
    """The label text `value` stands for: itself, else the one value equal to it ignoring case (``true`` for a
    boolean column's ``True``); a value the column lacks is a ConfigError listing what to type."""
    if value is None:
        return None
    if str(value) in values:
        return str(value)
    folded = [v for v in values if v.casefold() == str(value).casefold()]
    if len(folded) == 1:
        return folded[0]
    raise ConfigError(f"{what} {str(value)!r} is not a value of label column {column!r}; its values: {shown}")
