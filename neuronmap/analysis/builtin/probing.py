"""`probe`: cross-validated linear probe of a label column per layer, with a control task and selectivity.

Maths in `neuronmap.analysis.probing`. Each layer is one unit, so the artifact's units in layer order are
the accuracy-by-layer curve (`neuronmap.analysis.probing.accuracy_by_layer(artifact)`). Types
of the control task are samples: on per-token runs every token of a sample shares its control label, as
it shares its real one. On per-token runs the folds are grouped by sample too (a prompt's tokens are all in
train or all in test; metric ``folds`` says "grouped_by_prompt"), else the probe would be tested on prompts
it was trained on.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..inputs import LayerInput
from ..probing import probe
from ..registry import AnalysisResult, Params, register


class ProbeParams(Params):
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description="auto: regression for non-integer float labels, else classification")
    n_splits: int = Field(5, ge=2, description="cross-validation folds (stratified for classes; per-token runs: "
                                               "a prompt's tokens stay in one fold)")
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic probe")
    alpha: float = Field(1.0, ge=0, description="L2 strength of the ridge probe")
    max_iter: int = Field(1000, ge=1, description="solver iterations of the logistic probe")
    max_samples: int = Field(20_000, ge=2, description="rows used (seeded sample above this)")
    seed: int = Field(0, description="seeds folds, control labels and the row sample")


@register("probe", family="probing", params=ProbeParams, scope="layer", needs_labels=True,
          summary="linear probe of --labels per layer: CV accuracy, control-task accuracy, selectivity",
          headline=("accuracy_mean", "accuracy_std", "control_accuracy", "selectivity"),
          version="2")  # 2: on per-token runs the folds keep each prompt's tokens together
def probe_analysis(data: LayerInput, params: ProbeParams) -> AnalysisResult:
    x, positions = data.capped_sample(params.max_samples, params.seed, "probe")
    labels = data.labels(positions)
    sample_ids = data.sample_ids(positions)
    result = probe(x, labels, task=params.task, n_splits=params.n_splits, C=params.C, alpha=params.alpha,
                   max_iter=params.max_iter, types=sample_ids, seed=params.seed, groups=sample_ids)
    metrics = {"accuracy_mean": result.accuracy_mean, "accuracy_std": result.accuracy_std,
               "control_accuracy": result.control_mean, "control_std": result.control_std,
               "selectivity": result.selectivity, "task": result.task,
               "score": "accuracy" if result.task == "classification" else "r2",
               "n_rows": result.n_samples, "n_classes": result.n_classes,
               "folds": "rows" if result.n_groups is None else "grouped_by_prompt", "n_groups": result.n_groups}
    folds = pd.DataFrame({"fold": np.arange(len(result.scores)), "score": result.scores,
                          "control_score": result.control_scores})
    return AnalysisResult(metrics=metrics, arrays={"scores": result.scores, "control_scores": result.control_scores},
                          tables={"folds": folds})
