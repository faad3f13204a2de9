"""Writing intervention results as artifacts that `neuronmap.analysis.load_artifact` can open.

An intervention needs the live model, not a stored run, so its artifact goes to a folder of its own
(``--out``) or into a run's ``analyses/`` (``--run``, where the dashboard's gallery finds it). Same files as
an analysis artifact: ``result.json`` (``id, analysis, family: "interventions", scope: "model", params,
layers, units {"model": {rows, metrics}}, ...`` plus the method's summary at top level), ``arrays.npz``
(``model/<name>``), and a ``figure.html``; the circuit method adds ``graph.json``. Every file is written
to a temporary name and renamed; ``result.json`` comes last, so a folder with it is whole.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.artifacts import RESULT_NAME, load_artifact, to_jsonable
from ..errors import ConfigError
from ..store.manifest import storage_error

UNIT = "model"


def artifact_folder(out: str | os.PathLike | None, run: str | os.PathLike | None, method: str, params: dict,
                    overwrite: bool) -> Path:
    """``out``, or ``RUN/analyses/<method>-<12 hex of the parameters>``; refuses to replace without `overwrite`."""
    if out is None and run is None:
        raise ConfigError("give --out FOLDER (or --run RUN to store the result with a run's analyses)")
    if out is not None:
        folder = Path(out)
    else:
        if not (Path(run) / "manifest.json").is_file():
            raise ConfigError(f"{run} is not a run folder (no manifest.json): give a run written by "
                              "`neuronmap extract`")
        digest = hashlib.sha256(json.dumps(to_jsonable(params), sort_keys=True).encode()).hexdigest()[:12]
        folder = Path(run) / "analyses" / f"{method}-{digest}"
    if any(path.exists() and not path.is_dir() for path in (folder, *folder.parents)):
        raise storage_error(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)),
                            folder / RESULT_NAME, resumable=False)
    if (folder / RESULT_NAME).exists() and not overwrite:
        raise ConfigError(f"{folder} already holds a result; pass --overwrite or choose another --out")
    return folder


def _atomic(path: Path, write) -> None:
    temp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def scalar_metrics(summary: dict[str, Any], keys: list[str] | None = None) -> dict[str, Any]:
    """The summary's numbers and short strings (what a gallery card shows), `keys` first."""
    picked = {k: summary[k] for k in (keys or []) if k in summary}
    for key, value in summary.items():
        if key not in picked and (isinstance(value, (int, float, bool, str)) or value is None) and \
                not (isinstance(value, str) and len(value) > 80):
            picked[key] = value
    return picked


def write_intervention(folder: Path, method: str, params: dict[str, Any], summary: dict[str, Any],
                       arrays: dict[str, np.ndarray], figure: Any = None, extra_json: dict[str, Any] | None = None,
                       metrics: list[str] | None = None, n_rows: int = 1, run: str | os.PathLike | None = None,
                       started: float | None = None, npy: bool = False) -> Any:
    """Write the artifact into `folder` and return it loaded (`neuronmap.analysis.Artifact`).

    `npy`: also write each array as ``<name>.npy`` (the files `neuronmap patch` always wrote).
    """
    from .. import __version__

    digest = hashlib.sha256(json.dumps(to_jsonable(params), sort_keys=True).encode()).hexdigest()[:12]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc = {"id": f"{method}-{digest}", "analysis": method, "family": "interventions", "scope": "model",
           "params": params, "layers": summary.get("layers", []), "labels": None,
           "run": {"path": str(run) if run is not None else None, "status": "complete", "partial": False,
                   "n_samples": n_rows},
           "units": {UNIT: {"rows": n_rows, "rows_total": n_rows, "metrics": scalar_metrics(summary, metrics)}},
           "warnings": [], "engine": "local", "created": created,
           "elapsed_s": None if started is None else round(time.time() - started, 3),
           "neuronmap_version": __version__}
    doc.update({k: v for k, v in summary.items() if k not in doc})
    files = {"arrays": "arrays.npz", **({"figure": "figure.html"} if figure is not None else {}),
             **{name: f"{name}.json" for name in (extra_json or {})},
             **({name: f"{name}.npy" for name in arrays} if npy else {})}
    doc["files"] = files
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic(folder / "arrays.npz", lambda p: _savez(p, {f"{UNIT}/{k}": np.asarray(v) for k, v in arrays.items()}))
        if npy:
            for name, value in arrays.items():
                _atomic(folder / f"{name}.npy", lambda p, v=value: _save_npy(p, v))
        for name, value in (extra_json or {}).items():
            _atomic(folder / f"{name}.json", lambda p, v=value: p.write_text(
                json.dumps(to_jsonable(v), indent=2, allow_nan=False) + "\n", encoding="utf-8"))
        if figure is not None:
            _atomic(folder / "figure.html", lambda p: p.write_text(
                figure.to_html(include_plotlyjs="cdn", full_html=True, config={"displaylogo": False}),
                encoding="utf-8"))
        _atomic(folder / RESULT_NAME, lambda p: p.write_text(
            json.dumps(to_jsonable(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8"))
    except OSError as error:  # a parent that is a file, no permission, a full disk: one line each
        raise storage_error(error, folder / RESULT_NAME, resumable=False) from None
    return load_artifact(folder)


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _save_npy(path: Path, value: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.asarray(value))
