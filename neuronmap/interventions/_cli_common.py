"""Shared pieces of the intervention commands: options, progress bar, prompt and pairs files, writing.

The commands themselves live in `cli.py` (patch, trace, ablate, steer) and `cli_heads.py` (heads, circuit,
counterfactual); each is a thin layer over one method.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

MODEL = typer.Option(..., "--model", "-m", help="Registry name, local folder or hub id (loaded with its LM head).")
OUT = typer.Option(None, "--out", "-o", help="Folder for the artifact (result.json, arrays.npz, figure.html).")
RUN = typer.Option(None, "--run", help="Store the artifact in this run's analyses/ (shown in the dashboard gallery) "
                                        "instead of --out; the run must come from the same model.")
DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N.")
OVERWRITE = typer.Option(False, help="Replace an existing result.")
AS_JSON = typer.Option(False, "--json", help="Print result.json instead of a summary.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr.")


class ProgressBar:
    """A rich progress bar fed by the methods' ``progress(done, total)`` callbacks."""

    def __init__(self, enabled: bool, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err_console, disable=not enabled, transient=True)
        self.task = None

    def __enter__(self) -> "ProgressBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=total)
        self.progress.update(self.task, completed=done, total=total)


def load_head_model(model: str, device: str, run: Optional[Path] = None):
    """The model with its LM head; with `run` (the --run destination), also refuse a run of another model."""
    from ..cli import _quiet_libraries
    from ..models.loading import load_model

    _quiet_libraries()  # as `extract`: no loading bar or library chatter around the command's own output
    loaded = load_model(model, device=device, head=True)
    if run is not None:
        from ..store import open_run
        from ._common import check_run_model

        check_run_model(open_run(run), loaded, "store the result with a run of this model (--run), or use --out "
                                               "FOLDER")
    return loaded


def output_folder(out, run, method: str, params: dict, overwrite: bool) -> Path:
    """Where the artifact goes: --out or --run, never both (refused before the model is loaded)."""
    from ..errors import ConfigError
    from .artifacts import artifact_folder

    if out is not None and run is not None:
        raise ConfigError("give --out FOLDER or --run RUN, not both: --run stores the artifact in RUN/analyses/, "
                          "--out in a folder of its own")
    return artifact_folder(out, run, method, params, overwrite)


def build_figure(build: Callable[[], Any]) -> Any:
    """The figure, or None (with a warning) when plotly (the dashboard extra) is missing."""
    try:
        return build()
    except ImportError as error:
        warnings.warn(f"figure skipped: {error} (install the dashboard extra: pip install 'neuronmap[dashboard]')",
                      stacklevel=2)
        return None


def write_artifact(out, run, method: str, params: dict, summary: dict, arrays: dict,
                   figure_fn: Callable[[dict], Any], overwrite: bool, as_json: bool, started: float, n_rows: int = 1,
                   metrics: list[str] | None = None, extra_json: dict | None = None, npy: bool = False):
    from .artifacts import artifact_folder, write_intervention

    # not output_folder: tcav reads its --run and may still write to --out (the intervention commands refused
    # --out with --run before loading the model)
    folder = artifact_folder(out, run, method, params, overwrite)
    figure = build_figure(lambda: figure_fn(summary))
    artifact = write_intervention(folder, method, params, summary, arrays, figure, extra_json, metrics, n_rows, run,
                                  started, npy)
    if as_json:
        sys.stdout.write(json.dumps(artifact.result, indent=2) + "\n")
    return artifact


def print_written(artifact) -> None:
    files = ", ".join(["result.json", *artifact.result.get("files", {}).values()])
    console.print(f"written: {artifact.path} ({files})", highlight=False)


def gather_prompts(prompts: Optional[List[str]], path: Optional[Path], what: str,
                   required: bool = True) -> list[str]:
    from ..errors import ConfigError
    from ..prompts import load_prompts

    texts = list(prompts or [])
    if path is not None:
        texts += load_prompts(path)["text"].astype(str).tolist()
    if required and not texts:
        raise ConfigError(f"no {what}: pass --{what} TEXT (repeatable) or --{what}s FILE")
    return texts


def read_pairs(path: Path) -> tuple[list[str], list[str], list | None]:
    """Clean / corrupted prompts (and targets when the file has token ids) from a pairs file.

    Either `neuronmap generate counterfactual` output (rows with ``pair_id``, ``role`` clean|corrupted,
    ``text`` and optionally ``answer_token_id`` / ``wrong_answer_token_id``), or rows with columns ``clean``
    and ``corrupted`` (or ``counterfactual``).
    """
    import pandas as pd

    from ..errors import ConfigError, PromptFileError
    from ..prompts import load_prompts

    path = Path(path)
    made_by = "write one with `neuronmap generate counterfactual --tokenizer MODEL --out pairs.csv`"
    if not path.exists():
        raise PromptFileError(f"pairs file {path} not found: check the path, or {made_by}")
    if path.is_dir():
        raise PromptFileError(f"pairs file {path} is a directory: pass a .csv, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = load_prompts(path)
    except PromptFileError:
        raise
    except (OSError, ValueError) as error:  # pandas' parser and empty-data errors are ValueErrors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PromptFileError(f"cannot read pairs file {path} ({reason}): {made_by}, or give columns clean, "
                              "corrupted") from None
    second = "corrupted" if "corrupted" in frame.columns else "counterfactual"
    if {"clean", second} <= set(frame.columns):
        return frame["clean"].astype(str).tolist(), frame[second].astype(str).tolist(), None
    if not {"pair_id", "role", "text"} <= set(frame.columns):
        raise ConfigError(f"pairs file {path} needs columns pair_id, role, text (from `neuronmap generate "
                          f"counterfactual`) or clean, corrupted; it has "
                          f"{', '.join(map(str, frame.columns)) or 'no columns'}")
    clean, corrupted, targets = [], [], []
    for pair_id, rows in frame.groupby("pair_id", sort=True):
        by_role = {str(r["role"]): r for _, r in rows.iterrows()}
        if set(by_role) != {"clean", "corrupted"}:
            raise ConfigError(f"pair {pair_id} of {path} needs one clean and one corrupted row; it has "
                              f"{', '.join(sorted(by_role))}")
        clean.append(str(by_role["clean"]["text"]))
        corrupted.append(str(by_role["corrupted"]["text"]))
        row = by_role["clean"]
        if "answer_token_id" in row and "wrong_answer_token_id" in row and pd.notna(row["answer_token_id"]):
            targets.append((int(row["answer_token_id"]), int(row["wrong_answer_token_id"])))
    return clean, corrupted, targets if len(targets) == len(clean) else None


def metric_target(answer: Optional[str], wrong: Optional[str]) -> Any:
    from ..errors import ConfigError

    if wrong is not None and answer is None:
        raise ConfigError("--wrong needs --answer (the metric is the logit of --answer minus that of --wrong)")
    if answer is None:
        return None
    return (answer, wrong) if wrong is not None else answer
