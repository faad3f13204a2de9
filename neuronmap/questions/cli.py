"""`neuronmap generate`: write a labelled prompt file from a template family, a local model or Ollama.

A thin layer: parse options, call one of ``generate_prompts`` / ``generate_local`` /
``generate_ollama``, write the table with ``save_prompts``. ``register(app)`` adds the command to the
`neuronmap` app (neuronmap/cli.py calls it).
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
BACKENDS = ("template", "local", "ollama")
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"  # same as neuronmap.questions.ollama.DEFAULT_URL, without the import


def register(app: typer.Typer) -> None:
    """Add the ``generate`` command to ``app``."""
    app.command("generate")(generate)


def generate(
    source: Optional[str] = typer.Argument(
        None, help="Template family (factual, sentiment, agreement, syntax, counterfactual) or a backend: "
                   "local | ollama."),
    count: int = typer.Option(100, "--count", "-n", help="Prompts to write (pairs for counterfactual)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same prompts."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file: .csv, .jsonl or .parquet."),
    list_families: bool = typer.Option(False, "--list", help="List the template families and exit."),
    backend: Optional[str] = typer.Option(None, "--backend", help="template | local | ollama (default: from SOURCE)."),
    min_words: Optional[int] = typer.Option(None, help="Keep prompts with at least this many words."),
    max_words: Optional[int] = typer.Option(None, help="Keep prompts with at most this many words."),
    tokenizer: Optional[str] = typer.Option(
        None, help="counterfactual: pairs get equal token length under this model's tokenizer (name or folder)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="local: registry name, local folder or hub id."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", "-p", help="local/ollama: seed prompts file (.txt, .jsonl, .csv, .parquet)."),
    text_column: Optional[str] = typer.Option(None, help="Column of --prompts holding the text."),
    max_new_tokens: Optional[int] = typer.Option(None, help="local/ollama: tokens per answer (default 32 / 256)."),
    temperature: Optional[float] = typer.Option(None, help="local/ollama: sampling temperature (default 1.0 / 0.8)."),
    top_p: float = typer.Option(0.95, help="local: nucleus sampling mass."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="local: prompts per generate call."),
    device: str = typer.Option("auto", help="local: auto | cpu | cuda | cuda:N."),
    include_prompt: bool = typer.Option(False, help="local: keep prompt + continuation instead of the first line."),
    ollama_url: str = typer.Option(DEFAULT_OLLAMA_URL, help="ollama: server URL."),
    ollama_model: Optional[str] = typer.Option(None, help="ollama: model name, as in `ollama list`."),
    timeout: float = typer.Option(120.0, help="ollama: seconds to wait for the server at any one step (with "
                                  "--no-stream, for the whole answer)."),
    retries: int = typer.Option(3, help="ollama: retries after a transient failure (backoff doubles from 0.5 s)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="ollama: stream answers chunk by chunk."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Generate a labelled prompt file: template families, a local model, or an Ollama server."""
    from neuronmap.errors import ConfigError

    if list_families:
        _print_families(as_json)
        return
    kind, family = _resolve_backend(source, backend)
    if out is None:
        raise ConfigError("no --out file given: pass e.g. --out prompts.csv (.csv, .jsonl or .parquet)")
    if kind != "local" and model is not None and not (kind == "ollama" and ollama_model is None):
        hint = " (for counterfactual token lengths use --tokenizer)" if family == "counterfactual" else ""
        raise ConfigError(f"--model is for --backend local, not {family or kind}{hint}: drop --model")
    if kind != "ollama" and ollama_model is not None:
        raise ConfigError(f"--ollama-model is for the ollama backend, not {family or kind}: drop it or use "
                          "`generate ollama`")
    if kind != "template" and tokenizer is not None:
        raise ConfigError("--tokenizer only applies to the counterfactual template family: drop it")
    if kind == "template" and prompts is not None:
        raise ConfigError(f"--prompts seeds the local/ollama backends; template family {family!r} needs none: drop it")

    from neuronmap.questions.output import check_output, save_prompts

    check_output(out, overwrite)  # before minutes of sampling, not after
    seeds = _seed_prompts(prompts, text_column)
    if kind == "template":
        from neuronmap.questions.families import generate_prompts

        df = generate_prompts(family, count, seed, min_words=min_words, max_words=max_words, tokenizer=tokenizer)
        what = f"template family {family}"
    elif kind == "local":
        if model is None:
            raise ConfigError("the local backend needs --model: a registry name (`neuronmap models list`), "
                              "a local folder or a hub id")
        from neuronmap.questions.local import generate_local

        _quiet_transformers()
        with console.status(f"sampling {count} texts from {model}", spinner="dots") if not as_json else nullcontext():
            df = generate_local(model, count, seed, prompts=seeds,
                                max_new_tokens=32 if max_new_tokens is None else max_new_tokens,
                                temperature=1.0 if temperature is None else temperature, top_p=top_p,
                                min_words=min_words, max_words=max_words, batch_size=batch_size, device=device,
                                include_prompt=include_prompt)
        what = f"model {model}"
    else:
        name = ollama_model or model
        if name is None:
            raise ConfigError("the ollama backend needs --ollama-model NAME (see `ollama list` on the server)")
        from neuronmap.questions.ollama import generate_ollama

        with console.status(f"asking {name} at {ollama_url}", spinner="dots") if not as_json else nullcontext():
            df = generate_ollama(name, count, seed, url=ollama_url, prompts=seeds,
                                 max_new_tokens=256 if max_new_tokens is None else max_new_tokens,
                                 temperature=0.8 if temperature is None else temperature, min_words=min_words,
                                 max_words=max_words, stream=stream, timeout=timeout, retries=retries)
        what = f"Ollama model {name}"

    path = save_prompts(df, out, overwrite=overwrite)
    labels = [c for c in df.columns if c != "text"]
    if as_json:
        sys.stdout.write(json.dumps({"path": str(path), "rows": len(df), "source": family or kind, "seed": seed,
                                     "columns": list(df.columns)}, indent=2) + "\n")
        return
    unit = f"{len(df) // 2} pairs ({len(df)} rows)" if family == "counterfactual" else f"{len(df)} prompts"
    console.print(f"wrote {unit} from {what} (seed {seed}) to [bold]{path}[/]", highlight=False)
    console.print(f"label columns: {', '.join(labels)}", highlight=False)
    console.print(f"extract activations: [bold]neuronmap extract -m MODEL -p {path} -o runs/NAME[/]", highlight=False)


def _resolve_backend(source: str | None, backend: str | None) -> tuple[str, str | None]:
    """(backend, template family or None) from the SOURCE argument and --backend."""
    from neuronmap.errors import ConfigError

    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    named = source.lower() if source else None
    if named in ("local", "ollama"):
        if backend not in (None, named):
            raise ConfigError(f"SOURCE {source!r} and --backend {backend!r} disagree: pass only one of them")
        return named, None
    if named is None:
        if backend in ("local", "ollama"):
            return backend, None
        raise ConfigError("pass a template family (factual, sentiment, agreement, syntax, counterfactual) or a "
                          "backend (local, ollama): see `neuronmap generate --list`")
    if backend not in (None, "template"):
        raise ConfigError(f"{source!r} is a template family name but --backend is {backend!r}: pass only one of them")
    from neuronmap.questions.families import get_family

    return "template", get_family(named).name


def _seed_prompts(prompts: Path | None, text_column: str | None) -> list[str] | None:
    if prompts is None:
        return None
    from neuronmap.prompts import load_prompts

    return load_prompts(prompts, text_column=text_column)["text"].tolist()


def _print_families(as_json: bool) -> None:
    from neuronmap.questions.families import list_families

    infos = list_families()
    if as_json:
        sys.stdout.write(json.dumps([info.__dict__ for info in infos], indent=2) + "\n")
        return
    table = Table(title="template families (neuronmap generate FAMILY --count N --out FILE)")
    for column in ("family", "available", "labels", "what"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.name, f"{info.available} {info.unit}", ", ".join(info.labels), info.description)
    console.print(table)
    console.print("Backends: [bold]generate local --model M[/] samples a local transformers model; "
                  "[bold]generate ollama --ollama-model NAME[/] asks an Ollama server "
                  f"(--ollama-url, default {DEFAULT_OLLAMA_URL}).")


def _quiet_transformers() -> None:
    """Hide transformers' progress bars and warnings that are not about the user's command."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
