"""`neuronmap patch|trace|ablate|steer|heads|circuit|counterfactual`: interventions on the live model.

Thin layers: load the model with its head, call the method's ``attribute`` (``generate`` for steering),
write an artifact (`artifacts.write_intervention`: result.json, arrays.npz, figure.html, graph.json for
circuits) into ``--out`` or into a run's analyses (``--run``), and print a short summary (or result.json
with ``--json``). ``register(app)`` adds the commands to the `neuronmap` app (neuronmap/cli.py calls it).
This file holds patch, trace, ablate and steer; `cli_heads.py` heads, circuit and counterfactual.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from ._cli_common import (AS_JSON, DEVICE, MODEL, OUT, OVERWRITE, PROGRESS, RUN, ProgressBar, console,
                          gather_prompts, load_head_model, output_folder, metric_target, print_written, write_artifact)


def register(app: typer.Typer) -> None:
    """Add the intervention commands to ``app``."""
    from .cli_heads import circuit, counterfactual, heads

    app.command("patch")(patch)
    app.command("trace")(trace)
    app.command("ablate")(ablate)
    app.command("steer")(steer)
    app.command("heads")(heads)
    app.command("circuit")(circuit)
    app.command("counterfactual")(counterfactual)


def patch(
    model: str = MODEL,
    clean: str = typer.Option(..., "--clean", help="Clean prompt (the one whose answer is --answer)."),
    corrupted: str = typer.Option(..., "--corrupted", help="Corrupted prompt, same token length as --clean."),
    answer: str = typer.Option(..., "--answer", help="Token the clean prompt predicts, e.g. ' Mary' (one token)."),
    wrong: str = typer.Option(..., "--wrong", help="Token the corrupted prompt favours (one token)."),
    out: Optional[Path] = OUT,
    run: Optional[Path] = RUN,
    layers: str = typer.Option("blocks.*", "--layers", "-l", help="Residual-stream layers: blocks.*, blocks.0-3, ..."),
    positions: str = typer.Option("each", "--positions", help="each: one column per position; all: all at once."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Patched forwards run together."),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
) -> None:
    """Activation patching: restore clean residual states into the corrupted run, layer by position."""
    from ..errors import ConfigError
    from .patching import ActivationPatching

    started = time.time()
    if clean == corrupted:
        raise ConfigError("--clean and --corrupted are the same prompt: patching restores nothing and the restored "
                          "fraction is undefined; corrupt the prompt (e.g. swap the name the answer depends on)")
    params = {"model": model, "clean": clean, "corrupted": corrupted, "answer": answer, "wrong": wrong,
              "layers": layers, "positions": positions}
    output_folder(out, run, "patch", params, overwrite)  # refuse early, before loading the model
    loaded = load_head_model(model, device, run)
    result = ActivationPatching(loaded, batch_size=batch_size).attribute(
        clean, baselines=corrupted, target=(answer, wrong), layers=layers, positions=positions)
    if result.clean_diff == result.corrupted_diff:
        raise ConfigError(f"clean and corrupted prompts give the same logit difference {result.clean_diff:.4f}, so "
                          "the restored fraction is undefined: choose a corruption that changes the answer")
    summary = {"method": "activation-patching", "model": loaded.name, "clean": clean, "corrupted": corrupted,
               "positions": positions, **result.summary()}

    def figure(s):
        from ..viz.interventions import tracing_heatmap

        return tracing_heatmap(result.restored, s["layers"], s["tokens"], title="activation patching",
                               value_title="restored")

    arrays = {"logit_diff": result.logit_diff, "restored": result.restored}
    artifact = write_artifact(out, run, "patch", params, summary, arrays, figure, overwrite, as_json, started,
                              metrics=["clean_logit_diff", "corrupted_logit_diff"], npy=True)
    if as_json:
        return
    best = summary["max_effect"]
    console.print(f"clean logit diff {result.clean_diff:.4f}, corrupted {result.corrupted_diff:.4f}; "
                  f"{len(result.layers)} layers x {result.logit_diff.shape[1]} positions")
    console.print(f"largest effect: {best['layer']} position {best['position']} -> logit diff {best['logit_diff']:.4f}")
    print_written(artifact)


def trace(
    model: str = MODEL,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt, e.g. 'The Eiffel Tower is in the city of'."),
    subject: str = typer.Option(..., "--subject", "-s", help="Subject substring whose tokens are noised."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Correct next token (one token); default the "
                                                                     "clean model's top prediction."),
    out: Optional[Path] = OUT,
    run: Optional[Path] = RUN,
    layers: str = typer.Option("blocks.*", "--layers", "-l", help="Restored states: blocks.* (residual), "
                                                                 "blocks.*.mlp, blocks.*.attn."),
    noise: float = typer.Option(3.0, "--noise", help="Noise in multiples of the embedding std."),
    samples: int = typer.Option(10, "--samples", help="Noise draws averaged per cell."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise."),
    window: int = typer.Option(1, "--window", help="Consecutive layers restored together (the paper: 10 for "
                                                   "mlp/attn)."),
    positions: str = typer.Option("each", "--positions", help="each | all"),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Rows per forward."),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """Causal tracing: noise the subject, restore one state at a time, heatmap of the indirect effect."""
    from ._common import readable_token
    from .tracing import CausalTracing

    started = time.time()
    params = {"model": model, "prompt": prompt, "subject": subject, "target": target, "layers": layers,
              "noise": noise, "samples": samples, "seed": seed, "window": window, "positions": positions}
    output_folder(out, run, "trace", params, overwrite)
    loaded = load_head_model(model, device, run)
    with ProgressBar(progress and not as_json, "tracing") as bar:
        result = CausalTracing(loaded, batch_size=batch_size).attribute(
            prompt, subject=subject, target=target, layers=layers, noise=noise, samples=samples, seed=seed,
            window=window, positions=positions, progress=bar)
    summary = {"model": loaded.name, "prompt": prompt, **result.summary()}

    def figure(s):
        from ..viz.interventions import tracing_heatmap

        return tracing_heatmap(result.effect, s["layers"], s["tokens"], result.subject,
                               title=f"causal tracing: p({readable_token(s['answer_token'])!r}) restored")

    arrays = {"probs": result.probs, "effect": result.effect}
    artifact = write_artifact(out, run, "trace", params, summary, arrays, figure,
                              overwrite, as_json, started, metrics=["clean_prob", "corrupted_prob"])
    if as_json:
        return
    best = summary["max_effect"]
    console.print(f"p({readable_token(result.answer_token)!r}) clean {result.clean_prob:.4f}, noised "
                  f"{result.corrupted_prob:.4f}; "
                  f"{len(result.layers)} layers x {result.probs.shape[1]} positions")
    where = repr(readable_token(result.tokens[best["position"]])) if result.positions == "each" else "all"
    console.print(f"largest indirect effect: {best['layer']} position {best['position']} ({where}) -> "
                  f"{best['effect']:+.4f}", highlight=False)
    print_written(artifact)


def ablate(
    model: str = MODEL,
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file (.txt, .csv, .jsonl, .parquet)."),
    components: str = typer.Option("blocks.*.attn.heads.*", "--layers", "-l",
                                   help="What to ablate: blocks.*.attn.heads.*, blocks.*.mlp, blocks.3.mlp[5,9], ..."),
    method: str = typer.Option("zero", "--method", help="zero | mean | resample"),
    answer: Optional[str] = typer.Option(None, "--answer", help="Metric token (with --wrong: logit difference; alone: "
                                                               "its log-probability). Default: next-token loss."),
    wrong: Optional[str] = typer.Option(None, "--wrong", help="Second token of the logit difference."),
    baseline: Optional[List[str]] = typer.Option(None, "--baseline", help="Reference prompt for mean/resample "
                                                                          "(repeatable; default the prompts)."),
    mean_run: Optional[Path] = typer.Option(None, "--mean-run", help="Take 'mean' values from this stored run."),
    together: bool = typer.Option(False, "--together", help="Ablate all components at once instead of one by one."),
    out: Optional[Path] = OUT,
    run: Optional[Path] = RUN,
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Prompts per forward."),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """Ablate heads, MLPs or neurons (zero, mean, resample) and report the change of loss or logit difference."""
    from .ablation import Ablation

    started = time.time()
    texts = gather_prompts(prompt, prompts, "prompt")
    target = metric_target(answer, wrong)
    params = {"model": model, "prompts": texts, "layers": components, "method": method, "target": target,
              "baselines": baseline or None, "mean_run": str(mean_run) if mean_run else None, "together": together}
    output_folder(out, run, "ablate", params, overwrite)
    loaded = load_head_model(model, device, run)
    with ProgressBar(progress and not as_json, "ablating") as bar:
        result = Ablation(loaded, batch_size=batch_size).attribute(
            texts, method=method, target=target, layers=components, baselines=baseline or None, run=mean_run,
            together=together, progress=bar)
    summary = {"model": loaded.name, **result.summary()}

    def figure(s):
        from ..viz.interventions import ablation_bars

        return ablation_bars(result.components, result.effect, s["metric"],
                             title=f"{method} ablation: effect on {s['metric']}")

    arrays = {"ablated": result.ablated, "effect": result.effect}
    artifact = write_artifact(out, run, "ablate", params, summary, arrays, figure, overwrite, as_json, started,
                              n_rows=len(texts), metrics=["metric", "clean"])
    if as_json:
        return
    console.print(f"{result.metric['metric']} clean {result.clean:.4f} over {len(texts)} prompt(s); "
                  f"{len(result.components)} ablation(s) ({method})")
    for row in summary["largest"][:5]:
        console.print(f"  {row['component']}: {row['ablated']:.4f} ({row['effect']:+.4f})", highlight=False)
    print_written(artifact)


def steer(
    model: str = MODEL,
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="A prompt to continue (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file."),
    layer: str = typer.Option(..., "--layers", "-l", help="One layer: blocks.N (residual stream), blocks.N.mlp, ..."),
    direction: Optional[Path] = typer.Option(None, "--direction", help=".npy file holding the direction (d,)."),
    positive: Optional[List[str]] = typer.Option(None, "--positive", help="Prompt of the 'towards' set (repeatable)."),
    negative: Optional[List[str]] = typer.Option(None, "--negative", help="Prompt of the 'away' set (repeatable)."),
    from_run: Optional[Path] = typer.Option(None, "--from-run", help="Stored run: difference of class means."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Label column of --from-run."),
    positive_label: Optional[str] = typer.Option(None, "--positive-label", help="Class steered towards."),
    negative_label: Optional[str] = typer.Option(None, "--negative-label", help="Class steered away from."),
    alpha: float = typer.Option(4.0, "--alpha", "-a", help="Scale of the added direction."),
    normalize: bool = typer.Option(False, "--normalize", help="Unit-norm the direction first."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", help="Tokens generated per prompt."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding (same seed both ways)."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = OUT,
    run: Optional[Path] = RUN,
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
) -> None:
    """Steering: generate with alpha * direction added at a layer, and without, side by side."""
    import numpy as np

    from ..errors import ConfigError
    from .steering import Steering, contrast_direction, load_direction, run_direction

    started = time.time()
    texts = gather_prompts(prompt, prompts, "prompt")
    sources = [direction is not None, bool(positive or negative), from_run is not None]
    if sum(sources) != 1:
        raise ConfigError("give exactly one direction: --direction FILE.npy, --positive/--negative prompts, or "
                          "--from-run RUN --labels COLUMN --positive-label A --negative-label B")
    params = {"model": model, "prompts": texts, "layers": layer, "alpha": alpha, "normalize": normalize,
              "max_new_tokens": max_new_tokens, "sample": sample, "seed": seed,
              "direction": str(direction) if direction else None, "positive": positive or None,
              "negative": negative or None, "from_run": str(from_run) if from_run else None, "labels": labels,
              "positive_label": positive_label, "negative_label": negative_label}
    output_folder(out, run, "steer", params, overwrite)
    loaded = load_head_model(model, device, run)
    if direction is not None:
        vector = direction
    elif from_run is not None:
        if not (labels and positive_label is not None and negative_label is not None):
            raise ConfigError("--from-run needs --labels COLUMN, --positive-label and --negative-label")
        vector = run_direction(from_run, layer, labels, positive_label, negative_label, loaded=loaded)
    else:
        if not (positive and negative):
            raise ConfigError("a contrast direction needs both --positive and --negative prompts")
        vector = contrast_direction(loaded, positive, negative, layer)
    result = Steering(loaded).generate(texts, vector, layers=layer, alpha=alpha, max_new_tokens=max_new_tokens,
                                       do_sample=sample, seed=seed, normalize=normalize)
    summary = {"model": loaded.name, **result.summary()}

    def figure(s):
        from ..viz.interventions import steering_table

        return steering_table(s["generations"], title=f"steering at {s['layer']}, alpha={s['alpha']}")

    arrays = {"direction": load_direction(vector).numpy().astype(np.float32)}
    artifact = write_artifact(out, run, "steer", params, summary, arrays, figure, overwrite, as_json, started,
                              n_rows=len(texts), metrics=["alpha", "n_changed"])
    if as_json:
        return
    for row in summary["generations"]:
        console.print(f"[bold]{row['prompt']}[/]", highlight=False)
        console.print(f"  without: {row['baseline']!r}", highlight=False)
        console.print(f"  with:    {row['steered']!r}", highlight=False)
    console.print(f"{summary['n_changed']} of {len(texts)} generation(s) changed; promoted: "
                  f"{', '.join(repr(t) for t, _ in result.promoted[:5])}", highlight=False)
    print_written(artifact)
