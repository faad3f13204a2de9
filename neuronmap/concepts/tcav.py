"""Testing with concept activation vectors (TCAV, Kim et al. 2018): how much a concept pushes a target.

For an input x, a layer l and a CAV v of that layer, the *conceptual sensitivity* is the directional
derivative of the target (a token's logit, a logit difference, a class logit or one neuron) along v:
``S(x) = grad_h target(x) . v``. The TCAV score is the fraction of inputs (of the target's class) with
S(x) > 0: 1 means adding the concept raises the target for every input, 0.5 is what a direction
unrelated to the target gives on average.

Which positions. A run stores one row per prompt pooled over tokens, so the CAV lives in pooled space.
Its directional derivative is taken for adding ``v`` at the positions the pooling reads: every real
token for ``mean``/``max`` pooling and per-token runs (adding v at every token shifts the mean, and each
coordinate's max, by v), the last real token for ``last``, the first for ``first``. So
``S(x) = sum over those positions t of grad_{h_t} target . v``; a mean instead of the sum would not
change its sign. One backward pass per batch of inputs gives the gradients of every layer at once.

Significance. A CAV fitted on a handful of examples can score high by chance. Following Kim et al.,
the concept's CAV is refitted against `random_runs` different random sets and compared with CAVs of
random-vs-random splits by a two-sided Student t-test (scipy). The null is built from pseudo-concepts
(random subsets as large as the concept set, each refitted over the same number of runs, see
`neuronmap.concepts.cav.cav_runs`): the concept's mean score is tested against the pseudo-concepts'
mean scores (`scipy.stats.ttest_ind(null_means, [concept_mean])`, a prediction t-test). Comparing the
concept's single-run scores with single random runs instead, as the paper's code does, ignores that
the runs share the concept's examples; in our simulations it called about a quarter of random
example sets significant at alpha = 0.05, this test about 5-10 %. Testing many layers and concepts
multiplies false positives: ``p_bonferroni = min(1, p * n_tests)`` (n_tests = layers x concepts) is
what ``significant`` uses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..capture import Capture
from ..errors import ConfigError
from ..interventions._common import as_prompts, check_stack, device_of, hidden_refs, make_batch, tokenize
from .cav import Classifier, cav_runs, check_max_examples, cosine_matrix

Progress = Callable[[int, int], None]
ALL_TOKENS = ("mean", "max", "none")
POOLINGS = ("mean", "max", "none", "last", "first")


@dataclass
class ConceptExamples:
    """Activations of one concept's examples and of random examples, per layer: {layer: (rows, d)}."""

    name: str
    concept: dict[str, np.ndarray]
    random: dict[str, np.ndarray]
    source: str = ""


@dataclass(frozen=True)
class Significance:
    """Two-sided t-test of a concept's mean TCAV score against pseudo-concepts' mean scores."""

    t: float
    p_value: float
    p_bonferroni: float
    significant: bool


def tcav_score(gradients: np.ndarray, vector: np.ndarray) -> float:
    """Fraction of inputs whose directional derivative along `vector` is positive.

    gradients : ndarray of shape (n_inputs, n_features), d target / d activation (summed over positions)
    vector : ndarray of shape (n_features,)
    """
    return float(np.mean(np.asarray(gradients, dtype=np.float64) @ np.asarray(vector, dtype=np.float64) > 0))


def significance(concept_mean: float, null_means: Sequence[float], n_tests: int = 1, alpha: float = 0.05
                 ) -> Significance:
    """Is `concept_mean` unlike the `null_means` (pseudo-concepts' mean TCAV scores)?

    ``scipy.stats.ttest_ind(null_means, [concept_mean])``: Student's two-sided t-test of one observation
    against a sample (t = (x - mean) / (s * sqrt(1 + 1/M)), M - 1 degrees of freedom). When the null
    means do not vary (every random direction gives the same score), p is 1 for an equal concept mean
    and 0 otherwise. ``p_bonferroni = min(1, p * n_tests)``; significant when it is below `alpha`.
    """
    from scipy import stats

    null = np.asarray(null_means, dtype=np.float64)
    if len(null) < 2:
        raise ConfigError(f"the significance test needs at least 2 random CAV sets, got {len(null)}: raise random_runs")
    if np.ptp(null) == 0:
        t, p = (0.0, 1.0) if concept_mean == null[0] else (float(np.sign(concept_mean - null[0]) * np.inf), 0.0)
    else:
        result = stats.ttest_ind(null, [concept_mean])
        t, p = -float(result.statistic), float(result.pvalue)
    corrected = min(1.0, p * max(1, int(n_tests)))
    return Significance(t=t, p_value=p, p_bonferroni=corrected, significant=bool(corrected < alpha))


@dataclass
class TCAVResult:
    """TCAV scores of concepts at layers for one target.

    scores : (n_concepts, n_layers, n_runs) TCAV score of each concept CAV run
    null_scores : (n_concepts, n_layers, n_sets, n_runs) scores of the random-vs-random CAVs
    accuracy, null_accuracy : held-out accuracies of those CAVs (same shapes)
    p_values, p_bonferroni : (n_concepts, n_layers); significant : bool (n_concepts, n_layers)
    similarity : (n_layers, n_concepts, n_concepts) cosine between the concepts' mean CAVs
    derivatives : (n_concepts, n_layers, n_inputs) directional derivative of each input along the
        concept's mean CAV (unit norm)
    target_values : (n_inputs,) the target on each input
    """

    concepts: list[str]
    layers: list[str]
    target: str
    target_description: str
    pooling: str
    positions: str
    inputs: list[str]
    scores: np.ndarray
    null_scores: np.ndarray
    accuracy: np.ndarray
    null_accuracy: np.ndarray
    p_values: np.ndarray
    p_bonferroni: np.ndarray
    significant: np.ndarray
    t_statistics: np.ndarray
    similarity: np.ndarray
    derivatives: np.ndarray
    target_values: np.ndarray
    alpha: float
    n_tests: int
    examples: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def tcav(self) -> np.ndarray:
        """(n_concepts, n_layers) mean TCAV score over the concept's runs."""
        return self.scores.mean(axis=-1)

    @property
    def tcav_std(self) -> np.ndarray:
        return self.scores.std(axis=-1)

    @property
    def null_mean(self) -> np.ndarray:
        """(n_concepts, n_layers) mean score of the random-vs-random CAVs."""
        return self.null_scores.mean(axis=(-2, -1))

    @property
    def null_std(self) -> np.ndarray:
        """(n_concepts, n_layers) spread of single random-vs-random CAV scores (the figure's error bars)."""
        return self.null_scores.reshape(*self.null_scores.shape[:2], -1).std(axis=-1)

    def summary(self) -> dict[str, Any]:
        rows = []
        for c, concept in enumerate(self.concepts):
            for l, layer in enumerate(self.layers):
                rows.append({"concept": concept, "layer": layer, "tcav": float(self.tcav[c, l]),
                             "tcav_std": float(self.tcav_std[c, l]), "random_mean": float(self.null_mean[c, l]),
                             "random_std": float(self.null_std[c, l]),
                             "cav_accuracy": float(self.accuracy[c, l].mean()),
                             "random_accuracy": float(self.null_accuracy[c, l].mean()),
                             "t": float(self.t_statistics[c, l]), "p_value": float(self.p_values[c, l]),
                             "p_bonferroni": float(self.p_bonferroni[c, l]),
                             "significant": bool(self.significant[c, l])})
        best = max(rows, key=lambda r: (r["significant"], abs(r["tcav"] - 0.5)))
        return {"target": self.target, "target_description": self.target_description, "concepts": self.concepts,
                "layers": self.layers, "pooling": self.pooling, "positions": self.positions,
                "n_inputs": len(self.inputs), "n_runs": int(self.scores.shape[-1]),
                "n_random_sets": int(self.null_scores.shape[-2]), "alpha": self.alpha, "n_tests": self.n_tests,
                "n_significant": int(self.significant.sum()), "best": best, "scores": rows,
                "examples": self.examples}


class TCAV:
    """TCAV on a loaded model (`load_model(..., head=True)` for logit targets).

    Parameters
    ----------
    loaded : LoadedModel
    batch_size : int
        Inputs per forward/backward pass.
    position : int
        Token position whose logits (or neuron) the target reads, counted in each input (-1: its last token).
    """

    def __init__(self, loaded: Any, batch_size: int = 8, position: int = -1) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        if isinstance(position, bool) or not isinstance(position, int):
            raise ConfigError(f"position={position!r} must be an integer (-1: the last token)")
        self.loaded = loaded
        self.model = loaded.model
        self.batch_size = batch_size
        self.position = position

    # -- gradients ------------------------------------------------------------------------------------
    def gradients(self, inputs: str | Sequence[str], target: str, layers: str | Sequence[str], pooling: str = "mean",
                  progress: Progress | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, Any]:
        """d target / d layer output summed over the positions `pooling` reads (see the module docstring).

        Returns ({layer: (n_inputs, d)}, target values (n_inputs,), the parsed target).
        """
        from ..attribution.targets import parse_target

        check_stack(self.loaded, "tcav")
        prompts = as_prompts(inputs, "inputs")
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r} must be one of {', '.join(POOLINGS)}")
        if isinstance(target, str) and target.strip().startswith("next-token"):
            raise ConfigError("target next-token differs between inputs; TCAV needs one target for all of them: "
                              "use token:' X', logit-diff:' A',' B', class:K or neuron:LAYER:I")
        parsed = parse_target(self.loaded, target)
        refs = hidden_refs(self.loaded, layers, "tcav")
        by_name = {ref.name: ref for ref in refs}
        neuron_ref = None
        if parsed.kind == "neuron":
            neuron_ref = by_name.get(parsed.layer) or hidden_refs(self.loaded, parsed.layer, "tcav")[0]
            by_name.setdefault(neuron_ref.name, neuron_ref)
        sequences = [tokenize(self.loaded, p) for p in prompts]
        shortest = min(len(s) for s in sequences)
        if not -shortest <= self.position < shortest:
            raise ConfigError(f"position={self.position} is outside the shortest input ({shortest} tokens); use "
                              f"0..{shortest - 1} or -1..-{shortest}")
        device = device_of(self.model)
        grads: dict[str, list[np.ndarray]] = {ref.name: [] for ref in refs}
        values: list[np.ndarray] = []
        unused: set[str] = set()
        for start in range(0, len(sequences), self.batch_size):
            batch = make_batch(self.loaded, sequences[start:start + self.batch_size])
            ids, mask = batch.ids.to(device), batch.mask.to(device)
            rows = torch.arange(len(batch), device=device)
            read = (batch.lengths.to(device) + self.position) if self.position < 0 else \
                torch.full_like(batch.lengths, self.position).to(device)
            with torch.enable_grad(), Capture(list(by_name.values()), detach=False,
                                              stop_early=parsed.kind == "neuron") as cap:
                output = cap.run(self.model, input_ids=ids, attention_mask=mask)
                value = self._target_values(parsed, output, cap.outputs, neuron_ref, rows, read)
                acts = [cap.outputs[ref.name] for ref in refs]
                found = torch.autograd.grad(value.sum(), acts, allow_unused=True)
            weights = self._position_weights(pooling, mask, batch.lengths.to(device))
            for ref, grad, act in zip(refs, found, acts):
                if grad is None:
                    unused.add(ref.name)
                    grad = torch.zeros_like(act)
                summed = (grad.float() * weights.reshape(*weights.shape, *([1] * (grad.dim() - 2)))).sum(dim=1)
                grads[ref.name].append(summed.reshape(len(batch), -1).detach().cpu().numpy().astype(np.float64))
            values.append(value.detach().float().cpu().numpy())
            if progress is not None:
                progress(min(start + self.batch_size, len(sequences)), len(sequences))
        for name in sorted(unused):
            warnings.warn(f"the target {target} does not depend on {name} (it is computed before it, or after the "
                          "target's layer): its TCAV scores are 0", UserWarning, stacklevel=2)
        return {name: np.concatenate(parts) for name, parts in grads.items()}, np.concatenate(values), parsed

    @staticmethod
    def _position_weights(pooling: str, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, seq): 1 at the positions the pooling reads, else 0."""
        if pooling in ALL_TOKENS:
            return mask.float()
        weights = torch.zeros_like(mask, dtype=torch.float32)
        rows = torch.arange(mask.shape[0], device=mask.device)
        weights[rows, (lengths - 1) if pooling == "last" else torch.zeros_like(lengths)] = 1.0
        return weights

    @staticmethod
    def _target_values(parsed: Any, output: Any, captured: Mapping[str, torch.Tensor], neuron_ref: Any,
                       rows: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        if parsed.kind == "neuron":
            hidden = captured[neuron_ref.name]
            if parsed.unit >= hidden.shape[-1]:
                raise ConfigError(f"target {parsed.spec!r}: {parsed.layer} has {hidden.shape[-1]} units; pick an "
                                  f"index below {hidden.shape[-1]}")
            return hidden[rows, read, parsed.unit].float()
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ConfigError(f"target {parsed.spec!r} needs logits: load the model with its head (head=True)")
        logits = logits.float()
        if parsed.kind == "class":
            if logits.dim() != 2:
                raise ConfigError(f"target {parsed.spec!r} needs a classification head; this model predicts tokens: "
                                  "use token: or logit-diff:")
            if parsed.unit >= logits.shape[-1]:
                raise ConfigError(f"target {parsed.spec!r}: the head has {logits.shape[-1]} classes")
            return logits[:, parsed.unit]
        if logits.dim() != 3:
            raise ConfigError(f"target {parsed.spec!r} needs token logits; this head gives shape {tuple(logits.shape)}: "
                              "use class:K")
        last = logits[rows, read]
        if parsed.kind == "logit-diff":
            return last[:, parsed.tokens[0]] - last[:, parsed.tokens[1]]
        return last[:, parsed.tokens[0]]

    # -- the verb ---------------------------------------------------------------------------------------
    def attribute(self, inputs: str | Sequence[str], concepts: ConceptExamples | Sequence[ConceptExamples],
                  target: str, layers: str | Sequence[str] | None = None, pooling: str = "mean",
                  random_runs: int = 10, max_examples: int | None = 500, classifier: Classifier = "logistic",
                  C: float = 0.1, test_fraction: float = 0.2, alpha: float = 0.05, seed: int = 0,
                  progress: Progress | None = None) -> TCAVResult:
        """TCAV scores of each concept at each layer for `target` over `inputs`, with significance.

        Parameters
        ----------
        inputs : prompt or list of prompts (examples of the target's class)
        concepts : ConceptExamples or list of them (`examples_from_run`, `examples_from_prompts`)
        target : token:' X' | logit-diff:' A',' B' | class:K | neuron:LAYER:I (`neuronmap.attribution.targets`)
        layers : canonical layers (default: the layers every concept has examples of)
        pooling : how the examples were pooled (a run's pooling): decides the positions of the derivative
        random_runs : CAV runs per concept and pseudo-concepts of the null (>= 2)
        max_examples : examples per side and run
        alpha : significance level, Bonferroni-corrected over layers x concepts
        """
        concepts = [concepts] if isinstance(concepts, ConceptExamples) else list(concepts)
        if not concepts:
            raise ConfigError("no concepts given: pass at least one ConceptExamples")
        names = [c.name for c in concepts]
        if len(set(names)) != len(names):
            raise ConfigError(f"concept names repeat ({', '.join(names)}): give each concept once")
        if isinstance(random_runs, bool) or not isinstance(random_runs, int) or random_runs < 2:
            raise ConfigError(f"random_runs={random_runs!r} must be an integer >= 2 (the t-test needs a sample)")
        if not 0 < alpha < 1:
            raise ConfigError(f"alpha={alpha!r} must be between 0 and 1")
        max_examples = check_max_examples(max_examples)
        if layers is None:
            shared = [l for l in concepts[0].concept if all(l in c.concept and l in c.random for c in concepts)]
            layers = shared
        refs = hidden_refs(self.loaded, layers, "tcav") if layers else []
        if not refs:
            raise ConfigError("no layers: pass layers that the concepts have examples of")
        names_l = [ref.name for ref in refs]
        for concept in concepts:
            missing = [l for l in names_l if l not in concept.concept or l not in concept.random]
            if missing:
                raise ConfigError(f"concept {concept.name!r} has no examples at {', '.join(missing)}; its layers: "
                                  f"{', '.join(concept.concept) or '(none)'}")
        total_fits = len(concepts) * len(names_l) * random_runs * (1 + random_runs)
        prompts = as_prompts(inputs, "inputs")
        steps = {"done": 0}

        def tick(extra: int) -> None:
            steps["done"] += extra
            if progress is not None:
                progress(steps["done"], len(prompts) + total_fits)

        grads, values, parsed = self.gradients(prompts, target, names_l, pooling,
                                               progress=lambda d, t: progress(d, t + total_fits) if progress else None)
        steps["done"] = len(prompts)
        n_c, n_l, R = len(concepts), len(names_l), random_runs
        scores = np.zeros((n_c, n_l, R))
        null_scores = np.zeros((n_c, n_l, R, R))
        accuracy = np.zeros((n_c, n_l, R))
        null_accuracy = np.zeros((n_c, n_l, R, R))
        derivatives = np.zeros((n_c, n_l, len(prompts)))
        mean_vectors = [[None] * n_c for _ in range(n_l)]
        examples: dict[str, dict[str, int]] = {}
        for c, concept in enumerate(concepts):
            for l, layer in enumerate(names_l):
                g = grads[layer]
                if concept.concept[layer].reshape(len(concept.concept[layer]), -1).shape[1] != g.shape[1]:
                    raise ConfigError(f"concept {concept.name!r} examples at {layer} have "
                                      f"{concept.concept[layer].reshape(len(concept.concept[layer]), -1).shape[1]} "
                                      f"features but the model's {layer} has {g.shape[1]}: the examples come from "
                                      "another model or layer")
                runs = cav_runs(concept.concept[layer], concept.random[layer], n_runs=R, null_sets=R,
                                max_examples=max_examples, classifier=classifier, C=C, test_fraction=test_fraction,
                                seed=seed, progress=lambda d, t: tick(1))
                vectors = runs.vectors
                scores[c, l] = (g @ vectors.T > 0).mean(axis=0)
                accuracy[c, l] = [cav.accuracy for cav in runs.concept]
                null = runs.null_vectors  # (sets, runs, d)
                null_scores[c, l] = (np.einsum("nd,srd->srn", g, null) > 0).mean(axis=-1)
                null_accuracy[c, l] = [[cav.accuracy for cav in set_] for set_ in runs.null]
                mean = vectors.mean(axis=0)
                norm = np.linalg.norm(mean)
                mean_vectors[l][c] = mean / norm if norm > 0 else mean
                derivatives[c, l] = g @ mean_vectors[l][c]
                examples[concept.name] = {"concept": int(len(concept.concept[layer])),
                                          "random": int(len(concept.random[layer])), "per_run": runs.size,
                                          "set_size": runs.set_size}
        n_tests = n_c * n_l
        tests = [[significance(float(scores[c, l].mean()), null_scores[c, l].mean(axis=-1), n_tests, alpha)
                  for l in range(n_l)] for c in range(n_c)]
        similarity = np.stack([cosine_matrix(np.stack(mean_vectors[l])) for l in range(n_l)])
        return TCAVResult(
            concepts=names, layers=names_l, target=target, target_description=parsed.describe(self.loaded.tokenizer),
            pooling=pooling, positions="all tokens" if pooling in ALL_TOKENS else f"{pooling} token",
            inputs=prompts, scores=scores, null_scores=null_scores, accuracy=accuracy, null_accuracy=null_accuracy,
            p_values=np.array([[t.p_value for t in row] for row in tests]),
            p_bonferroni=np.array([[t.p_bonferroni for t in row] for row in tests]),
            significant=np.array([[t.significant for t in row] for row in tests]),
            t_statistics=np.array([[t.t for t in row] for row in tests]),
            similarity=similarity, derivatives=derivatives, target_values=values, alpha=alpha, n_tests=n_tests,
            examples=examples)
