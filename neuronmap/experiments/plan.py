"""What an experiment will do, decided before any work: files, runs, layers, and what is already done.

`plan_prompts` says where the prompts come from (a file, or the file the generate step writes);
`plan_runs` turns each `model:` entry into a `RunTarget` (run folder, model to load, layer spec for
its family, fingerprint) and decides whether its run is new, to resume, or complete and reusable.
A complete run made with another configuration is a ConfigError at the key that differs, before
anything is computed: the experiment never mixes runs of two configurations.
"""

from __future__ import annotations

import re

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BUILTIN_PROMPTS, TINY_PREFIX, Experiment, GenerateSpec, ModelSpec

RUN_RECORD = "experiment.json"  # per run: the experiment, its fingerprint, seed and versions
FINGERPRINT_KEYS = ("model", "tiny_seed", "layers", "pooling", "format", "dtype", "max_length", "samples_per_shard",
                    "compression", "model_dtype", "prompts")


def digest(value: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:length]


@dataclass
class PromptsTarget:
    """The prompt file the runs read (generated into `<out>/prompts/` when `generate:` is used)."""

    path: Path
    generate: GenerateSpec | None
    text_column: str | None
    limit: int | None

    def load(self) -> Any:
        from ..prompts import load_prompts

        return load_prompts(self.path, text_column=self.text_column, limit=self.limit)


def plan_prompts(experiment: Experiment) -> PromptsTarget:
    spec = experiment.config.prompts
    if spec.generate is not None:
        generate = spec.generate.model_copy(update={"seed": spec.generate.seed if spec.generate.seed is not None
                                                    else experiment.config.seed})
        name = f"{generate.source}-{digest(generate.model_dump(mode='json'))}.parquet"
        return PromptsTarget(experiment.out_dir / "prompts" / name, generate, spec.text_column, spec.limit)
    if spec.file == BUILTIN_PROMPTS:
        from ..prompts import DEFAULT_PROMPTS

        return PromptsTarget(DEFAULT_PROMPTS, None, spec.text_column, spec.limit)
    path = Path(spec.file).expanduser()
    if not path.is_file():
        raise experiment.error(("prompts", "file"), f"prompt file {spec.file} does not exist (paths are relative to "
                                                    f"the folder you run from; {BUILTIN_PROMPTS} is the shipped set)")
    return PromptsTarget(path, None, spec.text_column, spec.limit)


def expected_columns(target: PromptsTarget) -> list[str] | None:
    """Label columns a generated prompt set will have, when that is known without generating it."""
    if target.generate is None or target.generate.source in ("local", "ollama"):
        return None
    from ..questions.families import FAMILIES

    return ["family", *FAMILIES[target.generate.source].labels]


def check_labels(experiment: Experiment, columns: list[str]) -> None:
    """Each analysis' `labels:` must be a column of the prompts."""
    shown = ", ".join(c for c in columns if c not in ("sample_id", "text")) or "(none)"
    for index, step in enumerate(experiment.config.analyses):
        if step.labels is not None and (step.labels not in columns or step.labels in ("sample_id", "text")):
            raise experiment.error(("analyses", index, "labels"), f"{step.labels!r} is not a column of the prompts; "
                                                                  f"label columns: {shown}")


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
@dataclass
class RunTarget:
    """One `model:` entry: the run it writes and how."""

    index: int
    spec: ModelSpec
    name: str
    path: Path
    model: str  # what extract() loads: the source, or the tiny model's folder
    tiny: str | None  # family of a tiny:FAMILY model
    family: str | None
    layers: str
    pooling: str
    format: str
    dtype: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    state: str = "new"  # new | resume | complete | stale (redo with --no-resume)
    why: str = ""

    @property
    def tiny_dir(self) -> Path | None:
        return Path(self.model) if self.tiny else None


def tiny_dir(experiment: Experiment, family: str) -> Path:
    """`<out>/models/tiny-<family>` (seed 0) or `tiny-<family>-seed<N>`: another seed is another model."""
    seed = experiment.config.seed
    return experiment.out_dir / "models" / (f"tiny-{family}" if seed == 0 else f"tiny-{family}-seed{seed}")


def model_family(source: str) -> str | None:
    """`config.model_type` of a model without loading its weights (None when it cannot be told offline)."""
    if source.startswith(TINY_PREFIX):
        return source[len(TINY_PREFIX):]
    config = Path(source).expanduser() / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return None
    from ..models.registry import get_entry

    entry = get_entry(source)
    if entry is not None:
        return entry.family
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).model_type
    except Exception:  # not cached, offline, or not a model: the extraction names the problem
        return None


def pick_layers(experiment: Experiment, template: str | dict[str, str], where: tuple, family: str | None,
                model_index: int) -> str:
    """The layer spec of `template` for `family`: the string itself, the family's entry, or `default`."""
    if isinstance(template, str):
        return template
    source = experiment.config.model[model_index].source
    if family is None:
        if "default" in template:
            return template["default"]
        raise experiment.error(("model", model_index, "source"),
                               f"cannot tell the model family of {source!r} offline, so `{_path(where)}` has no "
                               "entry for it: add `default: SPEC` there or give this model `layers:`")
    if family in template:
        return template[family]
    if "default" in template:
        return template["default"]
    raise experiment.error(where, f"no layer spec for model family {family!r} (model[{model_index}] {source}); add "
                                  f"`{family}: SPEC` or `default: SPEC` (families given: {', '.join(template)})")


def _path(where: tuple) -> str:
    from .source import format_path

    return format_path(where)


def plan_runs(experiment: Experiment) -> list[RunTarget]:
    """Every run of the experiment, in `model:` order (no prompts needed yet)."""
    config = experiment.config
    targets = []
    for index, spec in enumerate(config.model):
        tiny = spec.source[len(TINY_PREFIX):] if spec.source.startswith(TINY_PREFIX) else None
        if tiny is not None:
            from ..models.tiny import TINY_FAMILIES

            if tiny not in TINY_FAMILIES:
                raise experiment.error(("model", index, "source"), f"tiny:{tiny} is not a tiny family; use tiny:"
                                                                   f"{', tiny:'.join(TINY_FAMILIES)}")
        model = str(tiny_dir(experiment, tiny)) if tiny else spec.source
        template, where = ((spec.layers, ("model", index, "layers")) if spec.layers is not None
                           else (config.layers, ("layers",)))
        needs_family = isinstance(template, dict) or any(isinstance(step.layers, dict) for step in config.analyses)
        family = (tiny or model_family(spec.source)) if needs_family else tiny
        layers = pick_layers(experiment, template, where, family, index)
        targets.append(RunTarget(index=index, spec=spec, name=spec.run_name, path=experiment.out_dir / spec.run_name,
                                 model=model, tiny=tiny, family=family, layers=layers,
                                 pooling=spec.pooling or config.pooling, format=spec.format or config.format,
                                 dtype=spec.dtype or config.dtype))
    return targets


def check_out_dir(experiment: Experiment) -> None:
    """`outputs.dir` must be a folder or creatable as one: refused before anything runs, dry runs included."""
    out = experiment.out_dir
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == out else f"is under {folder}, which is a file"
                raise experiment.error(("outputs", "dir"), f"{out} {what}: give a folder for the experiment's output")
            return


def check_models(experiment: Experiment, targets: list[RunTarget]) -> None:
    """Every run's model and layer spec, and its analyses' layer specs, checked from the model's config
    before anything is written or extracted (an unknown layer used to surface after minutes of extraction,
    with folders and a report left behind). Tiny models are checked against the config they will be built
    with."""
    from ..analysis.runner import match_layers
    from ..errors import NeuronMapError, UnknownModelError
    from ..models.loading import layer_names

    from ..models.tiny import tiny_config

    for target in targets:
        where = ("model", target.index, "layers") if target.spec.layers is not None else ("layers",)
        try:
            if target.tiny:
                names = layer_names(f"tiny:{target.tiny}", target.layers, config=tiny_config(target.tiny))
            else:
                names = layer_names(target.model, target.layers)
        except UnknownModelError as error:
            raise experiment.error(("model", target.index, "source"), str(error)) from None
        except NeuronMapError as error:
            message = str(error)
            if target.tiny:  # the tiny model is not built yet: no `neuronmap models layers` to point at
                message = re.sub(r"\.? See `neuronmap models layers [^`]*`", "", message)
            raise experiment.error(where, message) from None
        for index in range(len(experiment.config.analyses)):
            spec = analysis_layers(experiment, target, index)
            try:
                match_layers(names, spec, f"the layers run {target.name} extracts")
            except NeuronMapError as error:
                raise experiment.error(("analyses", index, "layers"), str(error)) from None


def analysis_layers(experiment: Experiment, target: RunTarget, index: int) -> str | None:
    step = experiment.config.analyses[index]
    if step.layers is None:
        return None
    return pick_layers(experiment, step.layers, ("analyses", index, "layers"), target.family, target.index)


def fingerprint(experiment: Experiment, target: RunTarget, prompts_hash: str) -> dict[str, Any]:
    """What makes a run's numbers: equal fingerprints, same run (batch size, device and engine excluded)."""
    config = experiment.config
    return {"model": target.spec.source, "tiny_seed": config.seed if target.tiny else None, "layers": target.layers,
            "pooling": target.pooling, "format": target.format, "dtype": target.dtype, "max_length": config.max_length,
            "samples_per_shard": config.samples_per_shard, "compression": config.compression,
            "model_dtype": config.model_dtype, "prompts": prompts_hash}


def decide(experiment: Experiment, target: RunTarget, prompts_hash: str, resume: bool) -> None:
    """Set `target.state`: new, resume (unfinished run of this configuration), complete (reuse) or stale."""
    from ..store.manifest import MANIFEST_NAME, load_manifest

    target.fingerprint = fingerprint(experiment, target, prompts_hash)
    if not (target.path / MANIFEST_NAME).is_file():
        target.state = "new"
        return
    if not resume:
        target.state, target.why = "stale", "--no-resume: extracted again"
        return
    manifest = load_manifest(target.path)
    recorded = read_record(target.path)
    if recorded is not None:
        differ = [key for key in FINGERPRINT_KEYS if recorded.get("fingerprint", {}).get(key) != target.fingerprint[key]]
    else:  # a run this experiment did not record (e.g. `neuronmap demo`): compare what the manifest holds
        differ = [key for key, old, new in (("pooling", manifest.pooling, target.pooling),
                                           ("format", manifest.format, target.format),
                                           ("dtype", manifest.dtype, target.dtype),
                                           ("prompts", manifest.prompt_source_hash, prompts_hash)) if old != new]
    if differ:
        raise experiment.error(_key_of(experiment, target, differ[0]), f"{target.path} holds a {manifest.status} run of another configuration (differs "
                                    f"in: {', '.join(differ)}); run with --no-resume to extract it again, or set "
                                    "another outputs.dir")
    if manifest.status == "complete":
        target.state, target.why = "complete", "complete run reused"
    else:
        done = len({shard.index for shard in manifest.shards})
        target.state, target.why = "resume", f"{manifest.status} run: resuming after {done} committed shard(s)"


def _key_of(experiment: Experiment, target: RunTarget, key: str) -> tuple:
    """Where the file sets fingerprint `key` for this run (the model's own override, else the top level)."""
    if key == "prompts":
        return ("prompts",)
    if key == "tiny_seed":
        return ("seed",)
    if key != "model" and getattr(target.spec, key, None) is not None:
        return ("model", target.index, key)
    if key != "model" and (key,) in experiment.source.places:
        return (key,)
    return ("model", target.index)


def read_record(run: Path) -> dict | None:
    try:
        return json.loads((run / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
