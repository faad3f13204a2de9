"""`neuronmap tcav` and `neuronmap maximize`: concept sensitivity and activation maximisation on the live model.

Thin layers like the intervention commands: check the options, load the model, call the method, write
an artifact (result.json, arrays.npz, figure.html) into ``--out`` or the run's ``analyses/`` (where the
dashboard's gallery finds it) and print a short table. The stored-run halves of the family are analyses:
`neuronmap analyze RUN cav|top-activations`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..interventions._cli_common import (AS_JSON, DEVICE, MODEL, OUT, OVERWRITE, PROGRESS, ProgressBar, console,
                                         gather_prompts, print_written, write_artifact)


def register(app: typer.Typer) -> None:
    """Add ``tcav`` and ``maximize`` to ``app``."""
    app.command("tcav")(tcav)
    app.command("maximize")(maximize)


def _layers_for(loaded, run, layers: Optional[str]) -> list[str]:
    """Canonical hidden layers: --layers resolved on the model (and present in the run), else the run's."""
    from ..errors import ConfigError, UnknownLayerError
    from ..interventions._common import hidden_refs

    if layers is None:
        if run is None:
            raise ConfigError("pass --layers (e.g. 'blocks.*'): without --run there are no stored layers to default to")
        names = [name for name in run.layers if run.layer_info(name).kind == "hidden"]
        return [ref.name for ref in hidden_refs(loaded, ",".join(names), "tcav")]
    names = [ref.name for ref in hidden_refs(loaded, layers, "tcav")]
    if run is not None:
        missing = [name for name in names if name not in run.layers]
        if missing:
            raise UnknownLayerError(f"run {run.path} has no layer {', '.join(missing)}; it holds {', '.join(run.layers)}")
    return names


def tcav(
    model: str = MODEL,
    target: str = typer.Option(..., "--target", "-t", help="token:' X' | logit-diff:' A',' B' | class:K | "
                                                           "neuron:LAYER:I (one target for every input)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Prompt file of inputs of the target's class."),
    input_text: Optional[List[str]] = typer.Option(None, "--input", help="An input prompt (repeatable)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run holding the concept / random examples (same model); "
                                                           "the artifact goes to its analyses/ unless --out."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Label column of the run's prompts."),
    concept: Optional[List[str]] = typer.Option(None, "--concept", help="Label value of the concept rows "
                                                                        "(repeatable; with --concept-prompts: its name)."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Label value of the random rows (default: every "
                                                                    "row not of the concept; with --concept-prompts: "
                                                                    "every row)."),
    concept_prompts: Optional[Path] = typer.Option(None, "--concept-prompts", help="Prompt file of concept examples, "
                                                                                   "extracted now."),
    random_prompts: Optional[Path] = typer.Option(None, "--random-prompts", help="Prompt file of random examples, "
                                                                                 "extracted now (default: the run)."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers (default: the run's hidden layers)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Pooling of prompts extracted now (default: the "
                                                                  "run's, else mean)."),
    random_runs: int = typer.Option(10, "--random-runs", help="CAV runs per concept and random pseudo-concepts."),
    max_examples: int = typer.Option(500, "--max-examples", help="Examples per side and CAV run (>= 2)."),
    classifier: str = typer.Option("logistic", "--classifier", help="logistic | svm."),
    c: float = typer.Option(0.1, "--C", help="Inverse L2 strength of the CAV classifier."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level (Bonferroni over layers x concepts)."),
    position: int = typer.Option(-1, "--position", help="Token position the target reads (-1: each input's last)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the example samples and the splits."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Inputs per forward/backward pass."),
    out: Optional[Path] = OUT,
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """TCAV: does a concept (a run's label value, or concept prompts) push the target up, layer by layer?"""
    from ..errors import ConfigError
    from ..interventions.artifacts import artifact_folder
    from ..models.loading import load_model
    from ..prompts import load_prompts
    from ..store import open_run
    from .cav import check_max_examples
    from .examples import check_run_model, examples_from_prompts, examples_from_run
    from .tcav import TCAV, ConceptExamples

    started = time.time()
    check_max_examples(max_examples, "--max-examples")
    concepts = list(concept or [])
    if concept_prompts is None and not (run is not None and labels is not None and concepts):
        raise ConfigError("say where the concept examples are: --run RUN --labels COLUMN --concept VALUE, or "
                          "--concept-prompts FILE")
    if concept_prompts is not None and len(concepts) > 1:
        raise ConfigError("--concept-prompts holds one concept: give at most one --concept (its name)")
    if random_prompts is None and run is None:
        raise ConfigError("say where the random examples are: --run RUN (its other rows) or --random-prompts FILE")
    texts = gather_prompts(input_text, inputs, "input")
    params = {"model": model, "target": target, "inputs": texts, "run": str(run) if run else None, "labels": labels,
              "concepts": concepts, "negative": negative, "concept_prompts": str(concept_prompts) if concept_prompts
              else None, "random_prompts": str(random_prompts) if random_prompts else None, "layers": layers,
              "pooling": pooling, "random_runs": random_runs, "max_examples": max_examples, "classifier": classifier,
              "C": c, "alpha": alpha, "position": position, "seed": seed}
    artifact_folder(out, run, "tcav", params, overwrite)  # refuse early, before loading the model
    opened = open_run(run) if run is not None else None
    if opened is not None and labels is not None:
        from .examples import label_values

        label_values(opened, labels)
    run_pooling = opened.manifest.pooling if opened is not None else None
    if pooling is not None and run_pooling is not None and pooling != run_pooling:
        raise ConfigError(f"--pooling {pooling} differs from the run's pooling {run_pooling}: examples must be pooled "
                          "alike; drop --pooling")
    pooling = run_pooling or pooling or "mean"
    _quiet()
    loaded = load_model(model, device=device, head=True)
    if opened is not None:
        check_run_model(opened, loaded)
    names = _layers_for(loaded, opened, layers)
    max_length = int(opened.manifest.max_length or 512) if opened is not None else 512
    with console.status("reading concept examples") if not as_json else _Quiet():
        random_rows = examples_from_prompts(loaded, load_prompts(random_prompts)["text"].astype(str).tolist(), names,
                                            pooling, max_length=max_length) if random_prompts is not None else None
        examples = []
        if concept_prompts is not None:
            rows = examples_from_prompts(loaded, load_prompts(concept_prompts)["text"].astype(str).tolist(), names,
                                         pooling, max_length=max_length)
            name = concepts[0] if concepts else concept_prompts.stem
            if random_rows is not None:
                examples.append(ConceptExamples(name, rows, random_rows, source=f"{concept_prompts} vs {random_prompts}"))
            else:
                examples.append(examples_from_run(opened, names, labels, None, negative, max_rows=4 * max_examples,
                                                  seed=seed, concept_rows=rows, name=name))
        else:
            for value in concepts:
                found = examples_from_run(opened, names, labels, value, negative, max_rows=4 * max_examples, seed=seed)
                if random_rows is not None:
                    found.random = random_rows
                examples.append(found)
    with ProgressBar(progress and not as_json, "tcav") as bar:
        result = TCAV(loaded, batch_size=batch_size, position=position).attribute(
            texts, examples, target=target, layers=names, pooling=pooling, random_runs=random_runs,
            max_examples=max_examples, classifier=classifier, C=c, alpha=alpha, seed=seed, progress=bar)
    summary = {"method": "tcav", "model": loaded.name, **result.summary()}
    arrays = {"tcav": result.tcav, "tcav_std": result.tcav_std, "random_mean": result.null_mean,
              "random_std": result.null_std, "significant": result.significant, "p_values": result.p_values,
              "p_bonferroni": result.p_bonferroni, "t": result.t_statistics, "scores": result.scores,
              "random_scores": result.null_scores, "accuracy": result.accuracy, "random_accuracy": result.null_accuracy,
              "similarity": result.similarity, "derivatives": result.derivatives, "target_values": result.target_values}

    def figure(s):
        from ..interventions._common import readable_token
        from ..viz.concepts import tcav_figure

        return tcav_figure(result.layers, result.concepts, result.tcav, result.tcav_std, result.null_mean,
                           result.null_std, result.significant, result.p_values,
                           title=f"TCAV of {readable_token(result.target_description)} ({len(texts)} inputs; "
                                 "* significant after Bonferroni)")

    artifact = write_artifact(out, run, "tcav", params, summary, arrays, figure, overwrite, as_json, started,
                              n_rows=len(texts), metrics=["n_significant", "n_inputs", "target_description"])
    if as_json:
        return
    from ..interventions._common import readable_token

    table = Table(title=f"TCAV of {readable_token(result.target_description)} over {len(texts)} inputs "
                        f"({result.scores.shape[-1]} runs; random: {result.null_scores.shape[-2]} pseudo-concepts)")
    for column in ("concept", "layer", "TCAV", "random", "CAV acc", "p", "p (Bonferroni)", "significant"):
        table.add_column(column, justify="right" if column not in ("concept", "layer") else "left")
    for row in summary["scores"]:
        table.add_row(row["concept"], row["layer"], f"{row['tcav']:.3f} ± {row['tcav_std']:.3f}",
                      f"{row['random_mean']:.3f} ± {row['random_std']:.3f}", f"{row['cav_accuracy']:.3f}",
                      f"{row['p_value']:.3g}", f"{row['p_bonferroni']:.3g}",
                      "[green]yes[/]" if row["significant"] else "no")
    console.print(table)
    print_written(artifact)


def _quiet() -> None:
    """Hide transformers' load chatter, as the other model commands do."""
    from ..cli import _quiet_libraries

    _quiet_libraries()


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def maximize(
    model: str = typer.Option(..., "--model", "-m", help="Registry name, local folder or hub id."),
    neuron: str = typer.Option(..., "--neuron", "-n", help="LAYER:INDEX, e.g. blocks.3.mlp:17."),
    length: int = typer.Option(8, "--length", help="Soft-prompt positions (at most the model's positions)."),
    steps: int = typer.Option(200, "--steps", help="Adam steps."),
    lr: float = typer.Option(0.1, "--lr", help="Step size as a fraction of the median embedding norm."),
    l2: float = typer.Option(0.0, "--l2", help="Penalty on the positions' mean squared norm."),
    position: str = typer.Option("-1", "--position", help="Position whose activation is maximised (-1: last) or mean."),
    seed: int = typer.Option(0, "--seed", help="Seeds the start and the random baseline prompts."),
    nearest: int = typer.Option(5, "--nearest", help="Nearest vocabulary tokens reported per position."),
    random: int = typer.Option(64, "--random", help="Random token prompts of the baseline (0: none; at most 10000)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Random prompts per forward."),
    out: Optional[Path] = OUT,
    run: Optional[Path] = typer.Option(None, "--run", help="Store the artifact in this run's analyses/."),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """Optimise a soft prompt that maximises one neuron; report its nearest tokens and random baselines."""
    from ..errors import ConfigError
    from ..interventions.artifacts import artifact_folder
    from ..models.loading import load_model
    from .maximisation import ActivationMaximisation

    started = time.time()
    if position.strip() == "mean":
        where: int | str = "mean"
    else:
        try:
            where = int(position)
        except ValueError:
            raise ConfigError(f"--position {position!r} must be an integer (-1: the last position) or mean") from None
    params = {"model": model, "neuron": neuron, "length": length, "steps": steps, "lr": lr, "l2": l2,
              "position": where, "seed": seed, "nearest": nearest, "random": random}
    artifact_folder(out, run, "maximize", params, overwrite)
    _quiet()
    loaded = load_model(model, device=device)
    method = ActivationMaximisation(loaded, batch_size=batch_size)
    method.check(neuron, length=length, steps=steps, lr=lr, l2=l2, position=where, n_nearest=nearest, n_random=random)
    with ProgressBar(progress and not as_json, "optimising") as bar:  # the checks above print no bar residue
        result = method.maximize(
            neuron, length=length, steps=steps, lr=lr, l2=l2, position=where, seed=seed, n_nearest=nearest,
            n_random=random, progress=bar)
    summary = {"method": "maximize", "model": loaded.name, **result.summary()}
    arrays = {"embeddings": result.embeddings, "history": result.history, "nearest_ids": result.nearest_ids,
              "nearest_cosine": result.nearest_cosine, "random_activations": result.random_activations}

    def figure(s):
        from ..viz.concepts import maximisation_figure

        return maximisation_figure(result.history, s["nearest"], s["hard_activation"], s["random_best"],
                                   s["random_mean"], title=f"soft prompt maximising {result.neuron}")

    artifact = write_artifact(out, run, "maximize", params, summary, arrays, figure, overwrite, as_json, started,
                              metrics=["activation", "hard_activation", "random_best"])
    if as_json:
        return
    console.print(f"{result.neuron}: soft prompt {result.activation:.4g} (start {result.start_activation:.4g}, best at "
                  f"step {result.best_step}); nearest-token prompt {result.hard_activation:.4g}"
                  + (f"; random prompts best {summary['random_best']:.4g}, mean {summary['random_mean']:.4g}"
                     if summary["random_best"] is not None else ""), highlight=False)
    table = Table(title=f"nearest tokens (cosine); prompt {result.hard_text!r}")
    table.add_column("position", justify="right")
    table.add_column("tokens")
    for index, row in enumerate(summary["nearest"]):
        table.add_row(str(index), ", ".join(f"{t['token']!r} {t['cosine']:.2f}" for t in row))
    console.print(table)
    print_written(artifact)
