"""Analysis artifacts: `RUN/analyses/<id>/` with params.json, result.json, arrays.npz (only when the
analysis stores arrays: cka, rsa and evolution keep everything in result.json and their table), <table>.parquet.

The id is ``<name>-<12 hex of sha256(name, version, params, layers, labels column, shard sha256s)>``:
the same analysis asked again on the same data with the same parameters finds its artifact and
reuses it; a run that gained shards since (it was still running) gets a new id.

An artifact is written into ``analyses/.tmp-<id>-<pid>-<rand>/`` and renamed into place, so a reader
sees a whole artifact or none. `--force` replaces an existing one the same way (the old folder is
renamed aside, then deleted).

result.json::

    {"id", "analysis", "family", "scope", "params", "layers", "labels",
     "run": {"path", "status", "partial", "n_samples"},
     "units": {"<layer>" | "<layer a>|<layer b>" | "run": {"rows", "rows_total", "metrics": {...}}},
     "warnings": [...], "engine", "created", "elapsed_s", "neuronmap_version"}

arrays.npz holds ``<unit>/<name>`` keys; each table is one parquet file whose rows are every unit's
rows with the unit in a first column (``layer`` or ``pair``; none for "run" analyses).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RunFormatError, StorageError

ANALYSES_DIR = "analyses"
PARAMS_NAME = "params.json"
RESULT_NAME = "result.json"
ARRAYS_NAME = "arrays.npz"
UNIT_COLUMN = {"layer": "layer", "layer_pair": "pair", "run": None}
DAMAGED = ": the artifact is damaged; recompute it (`neuronmap analyze ... --force` replaces an analysis) or delete "


def artifact_id(name: str, version: str, params: dict, layers: list[str], labels: str | None,
                shard_hashes: list[str]) -> str:
    """``<name>-<12 hex>``: a digest of everything that determines the result."""
    key = json.dumps({"analysis": name, "version": version, "params": params, "layers": layers, "labels": labels,
                      "shards": shard_hashes}, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON); dict keys -> str."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Artifact:
    """An analysis artifact on disk (`load_artifact`), or just written / reused by `analyze`.

    Attributes
    ----------
    path : Path
    id : str
    result : dict
        result.json's contents (`metrics(unit)` reads one unit's metrics).
    reused : bool
        True when `analyze` found it instead of computing it.
    """

    path: Path
    result: dict
    reused: bool = False
    extra_warnings: list[str] = field(default_factory=list)
    _arrays: dict | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.result["id"]

    @property
    def analysis(self) -> str:
        return self.result["analysis"]

    @property
    def params(self) -> dict:
        return self.result["params"]

    @property
    def units(self) -> list[str]:
        return list(self.result["units"])

    @property
    def warnings(self) -> list[str]:
        """Warnings recorded with the result, plus this call's notes when it was reused."""
        return list(self.result.get("warnings", [])) + list(self.extra_warnings)

    @property
    def run_status(self) -> str:
        return self.result["run"]["status"]

    def metrics(self, unit: str | None = None) -> dict:
        """Metrics of `unit` (a layer, "a|b" pair or "run"); the only unit when None."""
        return self.result["units"][self._unit(unit)]["metrics"]

    def array(self, name: str, unit: str | None = None) -> np.ndarray:
        """Array `name` of `unit` from arrays.npz."""
        arrays = self.arrays
        key = f"{self._unit(unit)}/{name}"
        if key not in arrays:
            names = sorted({k.rsplit("/", 1)[1] for k in arrays})
            raise KeyError(f"artifact {self.id} has no array {name!r} for {self._unit(unit)}; arrays: {', '.join(names)}")
        return arrays[key]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, keyed ``<unit>/<name>`` (loaded once)."""
        if self._arrays is None:
            path = self.path / ARRAYS_NAME
            self._arrays = {}
            if path.is_file():
                with np.load(path, allow_pickle=False) as data:
                    self._arrays = {key: data[key] for key in data.files}
        return self._arrays

    def table(self, name: str):
        """Table `name` as a pandas DataFrame."""
        import pandas as pd

        path = self.path / f"{name}.parquet"
        if not path.is_file():
            tables = sorted(p.stem for p in self.path.glob("*.parquet"))
            raise KeyError(f"artifact {self.id} has no table {name!r}; tables: {', '.join(tables) or '(none)'}")
        return pd.read_parquet(path)

    @property
    def tables(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.parquet"))

    def _unit(self, unit: str | None) -> str:
        units = self.units
        if unit is None:
            if len(units) != 1:
                raise KeyError(f"artifact {self.id} has {len(units)} units; name one of {', '.join(units)}")
            return units[0]
        if unit not in units:
            raise KeyError(f"artifact {self.id} has no unit {unit!r}; units: {', '.join(units)}")
        return unit


def pair_matrix(artifact: Artifact, metric: str, symmetric: bool = True, diagonal: float | None = None):
    """A "layer_pair" artifact's `metric` as a layer x layer pandas DataFrame.

    Rows are each unit's first layer, columns its second, both in the artifact's layer order; with
    `symmetric`, an unordered pair (a, b) also fills (b, a) when that unit is absent. Cells no unit
    gives are NaN, except the diagonal when `diagonal` is given (``pair_matrix(artifact, "cka",
    diagonal=1.0)`` for the within-run CKA matrix).
    """
    import pandas as pd

    if artifact.result.get("scope") != "layer_pair":
        raise KeyError(f"artifact {artifact.id} is not a layer-pair analysis (scope {artifact.result.get('scope')!r})")
    layers = list(artifact.result["layers"])
    frame = pd.DataFrame(np.nan, index=pd.Index(layers, name="first"), columns=pd.Index(layers, name="second"))
    for unit, doc in artifact.result["units"].items():
        first = next((name for name in layers if unit.startswith(name + "|") and unit[len(name) + 1:] in layers), None)
        if first is None or metric not in doc["metrics"]:
            raise KeyError(f"artifact {artifact.id} unit {unit!r} has no metric {metric!r}; metrics: "
                           f"{', '.join(doc['metrics'])}")
        value = doc["metrics"][metric]
        second = unit[len(first) + 1:]
        frame.loc[first, second] = np.nan if value is None else value
    values = frame.to_numpy()
    if symmetric:
        values = np.where(np.isnan(values), values.T, values)
    if diagonal is not None:
        np.fill_diagonal(values, np.where(np.isnan(np.diag(values)), diagonal, np.diag(values)))
    return pd.DataFrame(values, index=frame.index, columns=frame.columns)


def analyses_dir(run_path: str | os.PathLike) -> Path:
    return Path(run_path) / ANALYSES_DIR


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read an artifact folder (RunFormatError if it is not a whole artifact)."""
    path = Path(path)
    try:
        result = json.loads((path / RESULT_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFormatError(f"{path} is not an analysis artifact (no {RESULT_NAME})") from None
    except (OSError, ValueError) as error:
        raise RunFormatError(f"cannot read {path / RESULT_NAME} ({' '.join(str(error).split())}){DAMAGED}"
                             f"{path}") from None
    if not isinstance(result, dict) or not isinstance(result.get("units"), dict) or "id" not in result:
        raise RunFormatError(f"cannot read {path / RESULT_NAME} (not an artifact's result: no id or units){DAMAGED}"
                             f"{path}")
    return Artifact(path, result)


def unreadable_artifacts(run_path: str | os.PathLike) -> list[tuple[Path, str]]:
    """(folder, reason) of every artifact folder of the run whose result.json cannot be read (what
    `list_artifacts` skips), so that callers can say so instead of leaving it out silently."""
    root = analyses_dir(run_path)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or not (path / RESULT_NAME).is_file():
            continue
        try:
            load_artifact(path)
        except RunFormatError as error:
            found.append((path, str(error)))
    return found


def find_artifact(run_path: str | os.PathLike, artifact_id: str) -> Artifact | None:
    """The artifact `artifact_id` of the run, or None when it does not exist (or is unreadable)."""
    path = analyses_dir(run_path) / artifact_id
    if not (path / RESULT_NAME).is_file():
        return None
    try:
        return load_artifact(path)
    except RunFormatError:
        return None


def list_artifacts(run_path: str | os.PathLike) -> list[Artifact]:
    """Every whole artifact of a run, sorted by id (temporary folders skipped)."""
    root = analyses_dir(run_path)
    if not root.is_dir():
        return []
    found = (find_artifact(run_path, p.name) for p in sorted(root.iterdir()) if not p.name.startswith("."))
    return [artifact for artifact in found if artifact is not None]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


STALE_AFTER_S = 24 * 3600


def _remove_stale(root: Path) -> None:
    """Delete temp/aside folders a crashed writer left behind (older than a day, so never a live one)."""
    now = time.time()
    for path in root.iterdir():
        if path.name.startswith((".tmp-", ".old-")):
            try:
                if now - path.stat().st_mtime > STALE_AFTER_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def write_artifact(run_path: str | os.PathLike, artifact_id: str, params_doc: dict, result_doc: dict,
                   arrays: dict[str, np.ndarray], tables: dict[str, Any], force: bool = False) -> Artifact:
    """Write the artifact atomically: temp folder, then rename to ``analyses/<id>``.

    When the folder already exists, `force` replaces it; otherwise the existing one is kept (another
    process wrote the same result first) and returned.
    """
    root = analyses_dir(run_path)
    final = root / artifact_id
    temp = root / f".tmp-{artifact_id}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        temp.mkdir(parents=True)
        _remove_stale(root)
        _write_json(temp / PARAMS_NAME, params_doc)
        if arrays:
            with open(temp / ARRAYS_NAME, "wb") as handle:
                np.savez(handle, **{key: np.asarray(value) for key, value in arrays.items()})
        for name, frame in tables.items():
            frame.to_parquet(temp / f"{name}.parquet", index=False)
        _write_json(temp / RESULT_NAME, result_doc)
        if final.exists() and force:
            aside = root / f".old-{artifact_id}-{secrets.token_hex(4)}"
            os.rename(final, aside)
            os.rename(temp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                os.rename(temp, final)
            except OSError:
                if not (final / RESULT_NAME).is_file():
                    raise
                shutil.rmtree(temp, ignore_errors=True)  # someone else wrote it first: same inputs, same result
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise StorageError(f"cannot write analysis artifact {final}: {error.strerror or error}; "
                           "check that the run folder is writable and has free space") from None
    try:
        return load_artifact(final)
    except RunFormatError as error:  # the folder that was there first is damaged: --force replaces it
        raise RunFormatError(f"{str(error).split(DAMAGED)[0]}: the existing artifact is damaged; pass --force to "
                             "recompute and replace it") from None
