"""`neuronmap heads|circuit|counterfactual`: attention-head statistics, circuit discovery, counterfactual pairs.

Registered by `cli.register`; shared options and writing in `_cli_common`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from ._cli_common import (AS_JSON, DEVICE, MODEL, OUT, OVERWRITE, PROGRESS, RUN, ProgressBar, console,
                          gather_prompts, load_head_model, output_folder, print_written, read_pairs, write_artifact)


def heads(
    model: str = MODEL,
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt for entropy/previous-token "
                                                                           "(repeatable; default random tokens)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file."),
    layers: str = typer.Option("blocks.*", "--layers", "-l", help="Blocks whose heads are scored."),
    seq_len: int = typer.Option(20, "--seq-len", help="Length of each half of the repeated random sequences."),
    n_sequences: int = typer.Option(8, "--sequences", help="Repeated random sequences."),
    seed: int = typer.Option(0, "--seed"),
    importance: str = typer.Option("auto", "--importance", help="Head ablation: zero | mean | none | auto (zero for "
                                                                "next-token models, none otherwise)."),
    out: Optional[Path] = OUT,
    run: Optional[Path] = RUN,
    batch_size: int = typer.Option(16, "--batch-size", "-b"),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """Per-head entropy, previous-token score, induction score and ablation importance."""
    from ..errors import ConfigError
    from .heads import HeadStatistics

    started = time.time()
    texts = gather_prompts(prompt, prompts, "prompt", required=False) or None
    if importance not in ("zero", "mean", "none", "auto", ""):
        raise ConfigError(f"--importance {importance!r} must be one of zero, mean, none, auto")
    importance = None if importance in ("none", "") else importance
    params = {"model": model, "prompts": texts, "layers": layers, "seq_len": seq_len, "n_sequences": n_sequences,
              "seed": seed, "importance": importance}
    output_folder(out, run, "heads", params, overwrite)
    loaded = load_head_model(model, device, run)
    if importance == "auto":
        from ._common import is_causal_lm

        importance = "zero" if is_causal_lm(loaded) else None
    with ProgressBar(progress and not as_json, "heads") as bar:
        result = HeadStatistics(loaded, batch_size=batch_size).attribute(
            texts, layers=layers, seq_len=seq_len, n_sequences=n_sequences, seed=seed, importance=importance,
            progress=bar)
    summary = {"model": loaded.name, **result.summary()}
    arrays = {"entropy": result.entropy, "prev_token": result.prev_token, "induction": result.induction}
    if result.importance is not None:
        arrays["importance"] = result.importance

    def figure(s):
        from ..viz.interventions import head_heatmaps

        return head_heatmaps(result.layers, arrays, title=f"attention heads of {loaded.name}")

    top = {k: (v[0]["head"] if v else None) for k, v in summary["top"].items()}
    summary.update({f"top_{k}": v for k, v in top.items()})
    artifact = write_artifact(out, run, "heads", params, summary, arrays, figure, overwrite, as_json, started,
                              metrics=[f"top_{k}" for k in top])
    if as_json:
        return
    for key, rows in summary["top"].items():
        shown = ", ".join(f"{r['head']} {r['value']:.3f}" for r in rows[:3])
        console.print(f"{key}: {shown}", highlight=False)
    print_written(artifact)


def circuit(
    model: str = MODEL,
    clean: Optional[List[str]] = typer.Option(None, "--clean", help="Clean prompt (repeatable)."),
    corrupted: Optional[List[str]] = typer.Option(None, "--corrupted", help="Corrupted prompt, one per --clean."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs file (neuronmap generate counterfactual output, "
                                                              "or columns clean, corrupted)."),
    answer: Optional[str] = typer.Option(None, "--answer", help="Token of the clean answer (one token)."),
    wrong: Optional[str] = typer.Option(None, "--wrong", help="Token the corrupted prompt favours."),
    layers: str = typer.Option("blocks.*", "--layers", "-l", help="Blocks whose heads and MLPs are nodes."),
    max_edges: int = typer.Option(50, "--max-edges", help="Strongest edges kept in graph.json."),
    out: Optional[Path] = OUT,
    run: Optional[Path] = RUN,
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """Circuit discovery by (edge) attribution patching: a graph of heads and MLPs with edge scores."""
    import numpy as np

    from ..errors import ConfigError
    from .circuits import AttributionPatching

    started = time.time()
    targets = None
    if pairs is not None:
        clean_texts, corrupted_texts, targets = read_pairs(pairs)
    else:
        clean_texts, corrupted_texts = list(clean or []), list(corrupted or [])
    if not clean_texts:
        raise ConfigError("give --clean/--corrupted prompts or --pairs FILE")
    if answer is not None or wrong is not None:
        if answer is None or wrong is None:
            raise ConfigError("give both --answer and --wrong")
        targets = (answer, wrong)
    if targets is None:
        raise ConfigError("give --answer and --wrong (or a pairs file with answer_token_id, wrong_answer_token_id: "
                          "`neuronmap generate counterfactual --tokenizer MODEL` writes those columns)")
    if isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1:
        raise ConfigError(f"--max-edges {max_edges!r} must be an integer >= 1 (the strongest edges kept in "
                          "graph.json)")
    params = {"model": model, "clean": clean_texts, "corrupted": corrupted_texts, "target": targets, "layers": layers,
              "max_edges": max_edges}
    output_folder(out, run, "circuit", params, overwrite)
    loaded = load_head_model(model, device, run)
    with ProgressBar(progress and not as_json, "attribution patching") as bar:
        result = AttributionPatching(loaded, batch_size=batch_size).attribute(
            clean_texts, baselines=corrupted_texts, target=targets, layers=layers, progress=bar)
    graph = result.graph(max_edges=max_edges)
    summary = {"model": loaded.name, "layers": [f"blocks.{b}" for b in sorted({n["layer"] for n in graph["nodes"]
                                                                              if n["kind"] in ("head", "mlp")})],
               **result.summary(), "graph": graph}

    def figure(s):
        from ..viz.interventions import circuit_graph

        return circuit_graph(graph, title=f"circuit of {loaded.name} (attribution patching)")

    top_edge = graph["edges"][0] if graph["edges"] else None
    summary["top_edge"] = f"{top_edge['source']} -> {top_edge['target']}" if top_edge else None
    arrays = {"node_scores": result.node_scores, "edge_scores": result.edge_scores, "nodes": np.asarray(result.nodes),
              "sources": np.asarray(result.sources), "targets": np.asarray(result.targets)}
    artifact = write_artifact(out, run, "circuit", params, summary, arrays, figure, overwrite, as_json, started,
                              n_rows=len(clean_texts), metrics=["clean_metric", "corrupted_metric", "top_edge"],
                              extra_json={"graph": graph})
    if as_json:
        return
    console.print(f"logit diff clean {result.clean_metric:.4f}, corrupted {result.corrupted_metric:.4f} over "
                  f"{result.n_pairs} pair(s); {len(result.nodes)} nodes")
    for edge in graph["edges"][:5]:
        console.print(f"  {edge['source']} -> {edge['target']}: {edge['score']:+.4f}", highlight=False)
    print_written(artifact)


def counterfactual(
    model: str = MODEL,
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Original prompt (repeatable)."),
    other: Optional[List[str]] = typer.Option(None, "--counterfactual", "-c", help="Counterfactual, one per --prompt."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs file (as for `neuronmap circuit`)."),
    layers: str = typer.Option("blocks.*", "--layers", "-l", help="Hidden layers compared."),
    top_k: int = typer.Option(10, "--top-k", help="Changed tokens reported."),
    out: Optional[Path] = OUT,
    run: Optional[Path] = RUN,
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = AS_JSON,
    progress: bool = PROGRESS,
) -> None:
    """Counterfactual pairs: per-layer change of the states and the next-token tokens that changed most."""
    from ..errors import ConfigError
    from .counterfactual import Counterfactual

    started = time.time()
    if pairs is not None:
        originals, others, _ = read_pairs(pairs)
    else:
        originals, others = list(prompt or []), list(other or [])
    if not originals:
        raise ConfigError("give --prompt/--counterfactual pairs or --pairs FILE")
    params = {"model": model, "inputs": originals, "baselines": others, "layers": layers, "top_k": top_k}
    output_folder(out, run, "counterfactual", params, overwrite)
    loaded = load_head_model(model, device, run)
    with ProgressBar(progress and not as_json, "pairs") as bar:
        result = Counterfactual(loaded).attribute(originals, baselines=others, layers=layers, top_k=top_k,
                                                  progress=bar)
    summary = {"model": loaded.name, **result.summary()}
    arrays = {"norms": result.norms, "relative": result.relative, "cosine": result.cosine, "kl": result.kl}
    if result.position_norms is not None:
        arrays["position_norms"] = result.position_norms

    def figure(s):
        from ..viz.interventions import counterfactual_figure

        return counterfactual_figure(s["layers"], s["mean_relative"], s["top_changed"],
                                     title=f"counterfactual pairs ({s['n_pairs']})")

    artifact = write_artifact(out, run, "counterfactual", params, summary, arrays, figure, overwrite, as_json, started,
                              n_rows=len(originals), metrics=["mean_kl", "most_changed_layer"])
    if as_json:
        return
    console.print(f"{result.kl.size} pair(s); mean KL {summary['mean_kl']:.4f}; most changed layer "
                  f"{summary['most_changed_layer']}", highlight=False)
    for row in result.top_changed[:5]:
        console.print(f"  {row['token']!r}: {row['prob']:.4f} -> {row['counterfactual_prob']:.4f}", highlight=False)
    print_written(artifact)
