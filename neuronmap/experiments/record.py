"""What an experiment leaves behind for reproducibility, and the report plugins.

- `<out>/experiment.resolved.yaml`: the configuration as run (profile applied, analysis seeds filled
  in), the profile, the seed, the source file's sha256 and the package versions.
- `<run>/experiment.json`: the same for each run, plus the run's fingerprint, which a later
  `neuronmap run` compares before reusing the run; the manifest's `extra["experiment"]` holds the
  same provenance (`neuronmap.store.annotate_run`, a no-op when nothing changed).
- `<out>/experiment.state.json`: the fingerprint of the inputs the last report was built from.

Files are rewritten only when their content changes, so re-running an experiment that is done
touches nothing. Reporters are entry points of the `neuronmap.reporters` group (`html` comes from
`dashboards`), so the core never imports plotly or Dash.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from ..store.manifest import storage_error
from .config import Experiment
from .plan import RUN_RECORD, RunTarget

RESOLVED_NAME = "experiment.resolved.yaml"
STATE_NAME = "experiment.state.json"
REPORTER_GROUP = "neuronmap.reporters"
EXTRA_HINT = "pip install -e '.[dashboard]'"


def package_versions() -> dict[str, str]:
    """Versions that decide the numbers: python, neuronmap, torch, transformers (no imports)."""
    from ..store.manifest import neuronmap_version

    versions = {"python": platform.python_version(), "neuronmap": neuronmap_version()}
    for name in ("torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolved_config(experiment: Experiment, engine: str) -> dict[str, Any]:
    config = experiment.config.model_dump(mode="json")
    config["engine"] = engine
    if engine == "local":
        config.pop("ray", None)
    return config


def resolved_document(experiment: Experiment, engine: str, targets: list[RunTarget]) -> dict[str, Any]:
    return {"experiment": experiment.config.name, "source": str(experiment.path),
            "source_sha256": experiment.text_sha256, "profile": experiment.profile,
            "seed": experiment.config.seed, "versions": package_versions(),
            "runs": {target.name: {"path": str(target.path), "model": target.model, "family": target.family,
                                   "layers": target.layers, "pooling": target.pooling, "format": target.format,
                                   "dtype": target.dtype} for target in targets},
            "config": resolved_config(experiment, engine)}


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` atomically unless the file already holds it; True when written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:  # a parent that is a file, no permission, a full disk: one line naming the cause
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself could not be made: no temp file exists
            pass
        raise storage_error(error, path) from None
    return True


def write_resolved(experiment: Experiment, document: dict[str, Any]) -> Path:
    path = experiment.out_dir / RESOLVED_NAME
    header = (f"# written by `neuronmap run {experiment.path}`: the configuration this experiment ran with\n"
              "# (profile applied, analysis seeds filled in), the seed and the package versions.\n")
    write_if_changed(path, header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return path


def write_run_record(target: RunTarget, document: dict[str, Any]) -> None:
    record = {**{k: document[k] for k in ("experiment", "source", "source_sha256", "profile", "seed", "versions")},
              "run": target.name, "fingerprint": target.fingerprint,
              "extraction": {k: v for k, v in document["config"].items() if k not in ("analyses", "outputs", "model")}
              | {"model": target.spec.model_dump(mode="json"), "layers": target.layers, "pooling": target.pooling,
                 "format": target.format, "dtype": target.dtype}}
    write_if_changed(target.path / RUN_RECORD, json.dumps(record, indent=2, sort_keys=False) + "\n")
    from ..store import annotate_run

    # Also in the manifest, where `neuronmap runs show` and every reader of the run see it.
    annotate_run(target.path, experiment={k: record[k] for k in ("experiment", "source_sha256", "profile", "seed",
                                                                "versions", "extraction")})


def read_state(experiment: Experiment) -> dict[str, Any]:
    try:
        return json.loads((experiment.out_dir / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_state(experiment: Experiment, state: dict[str, Any]) -> None:
    write_if_changed(experiment.out_dir / STATE_NAME, json.dumps(state, indent=2, sort_keys=True) + "\n")


class ReporterUnavailable(Exception):
    """The reporter cannot run here (not installed, or its extra is missing): the step is skipped."""


def reporter_names() -> list[str]:
    return sorted({entry.name for dist in metadata.distributions() for entry in dist.entry_points
                   if entry.group == REPORTER_GROUP})


def load_reporter(name: str) -> Callable[[dict[str, Any], Path], Path]:
    """The `write(experiment_summary, out) -> Path` function registered as reporter `name`."""
    entries = {}
    for dist in metadata.distributions():  # every distribution: a stale egg-info must not hide the installed one
        for entry in dist.entry_points:
            if entry.group == REPORTER_GROUP:
                entries.setdefault(entry.name, entry)
    if name not in entries:
        installed = ", ".join(sorted(entries)) or "none"
        raise ReporterUnavailable(f"no reporter {name!r} is installed (entry point group {REPORTER_GROUP}; installed: "
                                  f"{installed}); install neuronmap with the dashboard extra: {EXTRA_HINT}")
    try:
        return entries[name].load()
    except ImportError as error:
        raise ReporterUnavailable(f"the {name} report needs the dashboard extra ({EXTRA_HINT}): {error}") from None
