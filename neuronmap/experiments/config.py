"""The experiment file: one YAML describing prompts, models, layers, analyses and outputs.

`load_experiment(path, profile=None)` reads the file, applies a profile (`--profile` or the
`NEURONMAP_PROFILE` environment variable) from its `profiles:` section, validates the result with the
pydantic models below and checks every analysis against the registry (its name, and its parameters
with the analysis' own parameter model). Every mistake is one ConfigError naming the file, the line
and the key path as written: `experiment.yaml line 12: analyses[2].params.k: must be >= 2`.

Nothing here imports torch: a wrong file fails fast, before any model is loaded.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..prompts import BUILTIN_PROMPTS  # the shipped prompt set, neuronmap/data/questions.csv
from .source import AtPath, SourceMap, read_yaml, validation_error

PROFILE_ENV = "NEURONMAP_PROFILE"
TINY_PREFIX = "tiny:"
POOLINGS = ("mean", "last", "first", "max", "none")  # = neuronmap.pooling.POOLING_MODES (that module imports torch)
GENERATE_BACKENDS = ("local", "ollama")
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # one folder name the dashboard and Serve accept


class Strict(BaseModel):
    """Unknown keys are mistakes (a typo such as `batchsize:` must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


def _layer_template(value: Any) -> Any:
    """A layer spec string, or a mapping model family -> spec (`{gpt2: "blocks.*", default: "final"}`)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty; write a layer spec such as 'blocks.*'")
        return value
    if isinstance(value, dict):
        if not value:
            raise ValueError("must name at least one model family, e.g. {gpt2: 'blocks.*', default: 'blocks.*'}")
        for family, spec in value.items():
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError(f"the spec for family {family!r} must be a layer spec string such as 'blocks.*'")
        return {str(k): v for k, v in value.items()}
    raise ValueError(f"must be a layer spec string ('blocks.*') or a mapping family -> spec, not {type(value).__name__}")


LayerTemplate = Annotated[str | dict[str, str], BeforeValidator(_layer_template)]


class GenerateSpec(Strict):
    """`prompts: {generate: ...}`: a prompt set written by `neuronmap.questions` before extraction."""

    source: str = Field(description="template family (factual, sentiment, agreement, syntax, counterfactual), "
                                    "or a backend: local | ollama")
    count: int = Field(100, ge=1)
    seed: int | None = Field(None, ge=0, description="default: the experiment's seed")
    min_words: int | None = Field(None, ge=1)
    max_words: int | None = Field(None, ge=1)
    tokenizer: str | None = Field(None, description="counterfactual: equal token lengths under this tokenizer")
    model: str | None = Field(None, description="local: the model that writes the prompts")
    prompts: list[str] | None = Field(None, description="local/ollama: seed prompts")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    ollama_model: str | None = None
    ollama_url: str = "http://127.0.0.1:11434"
    timeout: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        value = value.strip().lower()
        if value in GENERATE_BACKENDS:
            return value
        from ..questions.families import FAMILIES

        if value not in FAMILIES:
            raise ValueError(f"{value!r} is not a template family ({', '.join(FAMILIES)}) or a backend "
                             f"({', '.join(GENERATE_BACKENDS)}); `neuronmap generate --list` describes them")
        return value

    @model_validator(mode="after")
    def _backend_options(self) -> "GenerateSpec":
        if self.source == "local" and not self.model:
            raise ValueError("the local backend needs `model:` (a registry name, a local folder or a hub id)")
        if self.source == "ollama" and not self.ollama_model:
            raise ValueError("the ollama backend needs `ollama_model:` (a name from `ollama list`)")
        return self


def _prompts_shorthand(value: Any) -> Any:
    return {"file": value} if isinstance(value, (str, os.PathLike)) else value


class PromptsSpec(Strict):
    """`prompts: FILE`, `prompts: {file: FILE, text_column: q, limit: 100}` or `prompts: {generate: {...}}`."""

    file: str | None = Field(None, description=f"prompt file (.txt, .jsonl, .csv, .parquet) or {BUILTIN_PROMPTS}")
    generate: GenerateSpec | None = None
    text_column: str | None = None
    limit: int | None = Field(None, ge=1, description="use the first N prompts only")

    @model_validator(mode="after")
    def _one_source(self) -> "PromptsSpec":
        if (self.file is None) == (self.generate is None):
            raise ValueError(f"give exactly one of `file:` (a prompt file or {BUILTIN_PROMPTS}) and `generate:`")
        return self


def _models_shorthand(value: Any) -> Any:
    """`model: gpt2`, `model: [gpt2, {source: bert, run: b}]` -> a list of mappings."""
    items = value if isinstance(value, list) else [value]
    return [{"source": item} if isinstance(item, str) else item for item in items]


class ModelSpec(Strict):
    """One model of the experiment; each gives one run (`<outputs.dir>/<run>`)."""

    source: str = Field(description="registry name, local folder, hub id, or tiny:FAMILY (a tiny random model "
                                    "built under <outputs.dir>/models)")
    run: str | None = Field(None, description="run folder name (default: from the source)")
    layers: LayerTemplate | None = None
    pooling: str | None = None
    format: Literal["hdf5", "parquet"] | None = None
    dtype: Literal["float32", "float16"] | None = None

    @field_validator("source")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        value = value.strip()
        if not value or value == TINY_PREFIX:
            raise ValueError("must name a model: a registry name (`neuronmap models list`), a folder, a hub id or "
                             "tiny:FAMILY")
        return value

    @field_validator("run")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        if value is not None and not RUN_NAME.match(value):
            raise ValueError(f"{value!r} must be one folder name of letters, digits, '.', '_' and '-' "
                             "(no slashes, not starting with '.' or '-')")
        return value

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, value: str | None) -> str | None:
        return None if value is None else _check_pooling(value)

    @property
    def run_name(self) -> str:
        """The run folder: `run`, else `tiny-gpt2` for tiny:gpt2, else the last path part of the source."""
        if self.run:
            return self.run
        if self.source.startswith(TINY_PREFIX):
            return f"tiny-{self.source[len(TINY_PREFIX):]}"
        name = Path(self.source.rstrip("/\\")).name or "model"
        return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip(".-") or "model"


def _check_pooling(value: str) -> str:
    if value not in POOLINGS:
        raise ValueError(f"{value!r} is not a pooling; use one of {', '.join(POOLINGS)}")
    return value


class AnalysisStepSpec(Strict):
    """One analysis, run over every run of the experiment (`neuronmap analyze RUN NAME ...`)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    layers: LayerTemplate | None = Field(None, description="layers of each run (default: all); per family allowed")
    labels: str | None = Field(None, description="prompts column with a label per sample")

    @field_validator("params", mode="before")
    @classmethod
    def _params_mapping(cls, value: Any) -> Any:
        return {} if value is None else value


class RaySpec(Strict):
    """Options of `engine: ray` (ignored by the local engine)."""

    address: str | None = Field(None, description="auto | HOST:PORT | ray://HOST:PORT; none: an embedded cluster")
    workers: int | None = Field(None, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0)
    analyses: bool = Field(True, description="run the analyses as Ray tasks too; false keeps them in-process, "
                                             "which is quicker for small runs (each Ray task costs ~0.1-1 s)")


class OutputsSpec(Strict):
    dir: str | None = Field(None, description="experiment folder (default runs/<name>)")
    report: bool = True
    reporter: str = Field("html", description="entry point name in the neuronmap.reporters group")

    @field_validator("reporter")
    @classmethod
    def _reporter(cls, value: str) -> str:
        """A name no package registers is a typo: refused here, not skipped at the end of the experiment.
        (A registered reporter whose extra is missing is still skipped then, with the install hint.)"""
        names = _group_names("neuronmap.reporters")
        if value not in names:
            raise ValueError(f"{value!r} is not an installed reporter; use one of {', '.join(sorted(names)) or '(none)'}")
        return value


class ExperimentConfig(Strict):
    """The experiment after the profile is applied (see README, "Experiments")."""

    name: str
    seed: int = Field(0, ge=0)
    prompts: Annotated[PromptsSpec, BeforeValidator(_prompts_shorthand)]
    model: Annotated[list[ModelSpec], BeforeValidator(_models_shorthand), Field(min_length=1)]
    layers: LayerTemplate = "blocks.*"
    pooling: str = "mean"
    format: Literal["hdf5", "parquet"] = "hdf5"
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(512, ge=2)
    samples_per_shard: int | None = Field(None, ge=1)
    compression: str | None = None
    device: str = "auto"
    model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    engine: str = "local"
    ray: RaySpec = Field(default_factory=RaySpec)
    analyses: list[AnalysisStepSpec] = Field(default_factory=list)
    outputs: OutputsSpec = Field(default_factory=OutputsSpec)

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, value: str) -> str:
        return _check_pooling(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not RUN_NAME.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '.', '_' and '-' (it names the default "
                             "output folder runs/<name>)")
        return value

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        names = engine_names()
        if value not in names:
            raise ValueError(f"{value!r} is not an installed engine; use one of {', '.join(names)}")
        return value

    @field_validator("analyses", mode="before")
    @classmethod
    def _analyses_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _unique_analyses(self) -> "ExperimentConfig":
        seen: dict[str, int] = {}
        for index, step in enumerate(self.analyses):
            key = step.model_dump_json()
            if key in seen:
                raise AtPath(("analyses", index), f"analysis {step.name!r} repeats analyses[{seen[key]}] (same params, "
                                                  "layers and labels); remove one, or change its params")
            seen[key] = index
        return self

    @model_validator(mode="after")
    def _unique_runs(self) -> "ExperimentConfig":
        seen: dict[str, int] = {}
        for index, spec in enumerate(self.model):
            if spec.run_name in seen:
                raise AtPath(("model", index), f"run name {spec.run_name!r} is also used by model[{seen[spec.run_name]}]; "
                                                  "give one of them `run: NAME`")
            seen[spec.run_name] = index
        return self

    def out_dir(self) -> Path:
        return Path(self.outputs.dir) if self.outputs.dir else Path("runs") / self.name


def _group_names(group: str) -> set[str]:
    return {entry.name for dist in metadata.distributions() for entry in dist.entry_points if entry.group == group}


def engine_names() -> list[str]:
    """`local` plus the engines installed for both extraction and analyses (entry points; no import)."""
    both = _group_names("neuronmap.engines") & _group_names("neuronmap.analysis_engines")
    return ["local", *sorted(both - {"local"})]


@dataclass
class Experiment:
    """A validated experiment: its config, where each key is written, and the profile applied."""

    config: ExperimentConfig
    source: SourceMap
    path: Path
    profile: str | None
    text_sha256: str

    def error(self, path: tuple, detail: str) -> ConfigError:
        """ConfigError `FILE line N: key.path: detail` for a problem found after validation."""
        return self.source.error(path, detail)

    @property
    def out_dir(self) -> Path:
        return self.config.out_dir()


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_experiment(path: str | os.PathLike, profile: str | None = None,
                    environ: typing.Mapping[str, str] | None = None) -> Experiment:
    """Read, profile and validate an experiment file.

    Parameters
    ----------
    path : path of the YAML file
    profile : str, optional
        Profile to apply; default the `NEURONMAP_PROFILE` environment variable; none when neither is set.
    environ : mapping, optional
        Environment to read `NEURONMAP_PROFILE` from (default `os.environ`).
    """
    import hashlib

    path = Path(path)
    data, source = read_yaml(path)
    text_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    environ = os.environ if environ is None else environ
    from_env = profile is None and bool(environ.get(PROFILE_ENV))
    chosen = profile if profile is not None else (environ.get(PROFILE_ENV) or None)
    data = apply_profile(data, source, chosen, from_env)
    data.setdefault("name", path.stem if RUN_NAME.match(path.stem) else "experiment")
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise validation_error(error, source, ExperimentConfig) from None
    experiment = Experiment(config, source, path, chosen, text_sha256)
    check_analyses(experiment)
    return experiment


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def apply_profile(data: dict, source: SourceMap, profile: str | None, from_env: bool = False) -> dict:
    """`data` without `profiles:`, with profile `profile` merged over it (mappings merged, the rest replaced)."""
    data = dict(data)
    profiles = data.pop("profiles", None)
    if profiles is None:
        profiles = {}
    if not isinstance(profiles, dict):
        raise source.error(("profiles",), "must be a mapping of profile name -> the keys it overrides "
                                          "(e.g. dev: {batch_size: 8})")
    for name, body in profiles.items():
        if not isinstance(body, dict):
            raise source.error(("profiles", name), "must be a mapping of the keys this profile overrides, "
                                                   "e.g. {batch_size: 8, device: cpu}")
        for key in ("profiles", "name"):
            if key in body:
                raise source.error(("profiles", name, key), f"a profile cannot change `{key}`")
    if profile is None:
        return data
    if profile not in profiles:
        how = f"the {PROFILE_ENV} environment variable" if from_env else "--profile"
        defined = ", ".join(map(str, profiles)) or "none (add a `profiles:` section)"
        raise ConfigError(f"{source.name}: profile {profile!r} (from {how}) is not defined; profiles: {defined}")
    source.overlay(("profiles", profile))
    return _merge(data, profiles[profile])


def check_analyses(experiment: Experiment) -> None:
    """Each analysis: a registered name, parameters its own model accepts, labels when it needs them.

    Analyses with a `seed` parameter get the experiment's seed unless they set their own, so one seed
    reproduces the whole experiment.
    """
    from ..analysis.registry import get_analysis

    config = experiment.config
    for index, step in enumerate(config.analyses):
        where = ("analyses", index)
        try:
            spec = get_analysis(step.name)
        except ConfigError as error:
            raise experiment.error(where + ("name",), str(error).replace(" (see `neuronmap analyze --list`)", "")
                                   + " (see `neuronmap analyze --list`)") from None
        step.name = spec.name
        params = dict(step.params)
        if "seed" in spec.params.model_fields and "seed" not in params:
            params["seed"] = config.seed
        try:
            spec.params(**params)
        except ValidationError as error:
            raise validation_error(error, experiment.source, spec.params, where + ("params",)) from None
        step.params = params
        if spec.needs_labels and step.labels is None:
            raise experiment.error(where, f"analysis {spec.name} needs a label column: add `labels: COLUMN` "
                                          "(a column of the prompts)")
        if step.labels is not None and not spec.uses_labels:
            raise experiment.error(where + ("labels",), f"analysis {spec.name} does not use labels; remove `labels:`")
