"""Run an experiment: generate -> extract (one run per model) -> analyses -> report.

Each step is checkpointed by its output and skipped when that output is already complete: generated
prompts are named by a digest of their settings; a complete run whose recorded fingerprint matches is
reused and an unfinished one resumes (the store keeps every committed shard); an analysis whose
artifact exists with the same parameters and shards is reused by the runner; the report is rebuilt
only when the runs or artifacts it shows changed. So re-running a finished experiment does no work,
and re-running an interrupted one continues where it stopped.

A failing step is reported in one line that says what was kept; the steps that do not depend on it
still run (another model's run, the report of what exists). The engine (`local` or `ray`) is handed
to both `neuronmap.extract` and the analysis runner, so the maths is the same code either way.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError, NeuronMapError
from .config import TINY_PREFIX, Experiment, engine_names
from .plan import (PromptsTarget, RunTarget, analysis_layers, check_labels, check_models, check_out_dir, decide,
                   digest, expected_columns, plan_prompts, plan_runs, tiny_dir)
from .record import (ReporterUnavailable, load_reporter, read_state, resolved_document, write_resolved,
                     write_run_record, write_state)

REPORT_NAME = "report.html"
SYMBOLS = {"done": "[green]✓[/]", "resumed": "[green]✓[/]", "skipped": "[dim]↷[/]", "failed": "[red]✗[/]",
           "planned": "[cyan]•[/]"}


@dataclass
class StepResult:
    """One step's outcome: `status` is done, resumed, skipped, failed or planned (dry run)."""

    step: str  # generate | extract | analyze | report
    target: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    user_error: bool = False

    def line(self) -> str:
        took = f" ({self.seconds:.1f} s)" if self.status in ("done", "resumed", "failed") and self.seconds else ""
        return f"{self.step} {self.target}: {self.status}{': ' + self.detail if self.detail else ''}{took}"


@dataclass
class ExperimentResult:
    experiment: Experiment
    engine: str
    dry_run: bool
    steps: list[StepResult] = field(default_factory=list)
    runs: dict[str, Path] = field(default_factory=dict)
    report: Path | None = None
    resolved: Path | None = None

    @property
    def failed(self) -> list[StepResult]:
        return [step for step in self.steps if step.status == "failed"]

    @property
    def out_dir(self) -> Path:
        return self.experiment.out_dir

    def of(self, step: str) -> list[StepResult]:
        return [item for item in self.steps if item.step == step]


def run_experiment(experiment: Experiment, engine: str | None = None, resume: bool = True, dry_run: bool = False,
                   console: Any = None) -> ExperimentResult:
    """Run (or with `dry_run`, only plan) `experiment`; see the module docstring.

    Parameters
    ----------
    experiment : Experiment from `load_experiment`
    engine : "local" | "ray", optional
        Overrides the file's `engine:`.
    resume : bool
        False redoes every step: prompts generated again, runs extracted again (the old run is
        replaced), analyses recomputed, report rewritten.
    console : rich.console.Console, optional
        Where the status lines and progress bars go; None runs silently.

    Returns
    -------
    ExperimentResult
        Every step's outcome; `failed` lists the failed ones. Configuration mistakes found while
        planning (a label column the prompts lack, a complete run of another configuration) raise
        ConfigError before any work.
    """
    return Pipeline(experiment, engine, resume, dry_run, console).run()


class Pipeline:
    def __init__(self, experiment: Experiment, engine: str | None, resume: bool, dry_run: bool, console: Any) -> None:
        chosen = engine or experiment.config.engine
        if chosen not in engine_names():
            raise ConfigError(f"--engine {chosen!r} is not installed; use one of {', '.join(engine_names())}")
        self.experiment, self.config = experiment, experiment.config
        self.engine, self.resume, self.dry_run, self.console = chosen, resume, dry_run, console
        self.result = ExperimentResult(experiment, chosen, dry_run)
        self._analysis_engine: Any = None
        self.artifacts: dict[str, list[str]] = {}  # run name -> ids of this experiment's artifacts

    # -- reporting -------------------------------------------------------------------------------
    def _record(self, item: StepResult) -> StepResult:
        self.result.steps.append(item)
        if self.console is not None:
            from rich.markup import escape

            self.console.print(f"{SYMBOLS.get(item.status, '')} {escape(item.line())}", highlight=False, soft_wrap=True)
        return item

    @contextlib.contextmanager
    def _status(self, text: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        with self.console.status(text, spinner="dots"):
            yield

    def _fail(self, step: str, target: str, error: BaseException, kept: str, started: float) -> StepResult:
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, NeuronMapError):
            message = f"{type(error).__name__}: {message}"
        return self._record(StepResult(step, target, "failed", f"{message}; {kept}", time.perf_counter() - started,
                                       isinstance(error, NeuronMapError)))

    # -- the steps -------------------------------------------------------------------------------
    def run(self) -> ExperimentResult:
        experiment = self.experiment
        check_out_dir(experiment)
        targets = plan_runs(experiment)
        check_models(experiment, targets)
        prompts = plan_prompts(experiment)
        self.result.runs = {target.name: target.path for target in targets}
        if not self.generate(prompts):
            for target in targets:
                self._record(StepResult("extract", target.name, "skipped", "no prompts (the generate step failed)"))
            return self.result
        frame = self._load_prompts(prompts) if prompts.path.is_file() else None
        if frame is not None:
            from ..prompts import prompt_source_hash

            check_labels(experiment, list(frame.columns))
            prompts_hash = prompt_source_hash(frame)
            for target in targets:
                decide(experiment, target, prompts_hash, self.resume)
        else:  # dry run before the prompts are generated
            columns = expected_columns(prompts)
            if columns is not None:
                check_labels(experiment, ["text", *columns])
        document = resolved_document(experiment, self.engine, targets)
        if not self.dry_run:
            self.result.resolved = write_resolved(experiment, document)
        for target in targets:
            self.extract(target, prompts, frame, document)
        for target in targets:
            self.analyze(target)
        self.report(targets, document)
        return self.result

    def _load_prompts(self, prompts: PromptsTarget) -> Any:
        """The prompt table; a mistake in it as one line at the `prompts` key, in the file's words
        (`text_column`, not the command line's `--text-column`)."""
        try:
            return prompts.load()
        except NeuronMapError as error:  # PromptFileError, ConfigError
            message = str(error).replace("--text-column", "text_column")
            key = ("prompts", "text_column") if "text_column" in message else ("prompts",)
            raise self.experiment.error(key, message) from None

    def generate(self, prompts: PromptsTarget) -> bool:
        spec = prompts.generate
        if spec is None:
            return True
        what = f"{spec.source} x {spec.count}"
        if prompts.path.is_file() and self.resume:
            self._record(StepResult("generate", what, "skipped", f"{prompts.path} exists"))
            return True
        templates = spec.source not in ("local", "ollama")  # deterministic and quick: checked in a dry run too
        if self.dry_run:
            if templates:
                self._template_frame(spec)
            self._record(StepResult("generate", what, "planned", f"write {prompts.path} (seed {spec.seed})"))
            return True
        started = time.perf_counter()
        try:
            with self._status(f"generate {what} prompts"):
                frame = self._template_frame(spec) if templates else self._generate_frame(spec)
                from ..questions.output import save_prompts

                save_prompts(frame, prompts.path, overwrite=True)
        except KeyboardInterrupt:
            raise
        except ConfigError:  # a mistake in prompts.generate, already said against its key
            raise
        except Exception as error:
            self._fail("generate", what, error, "no prompt file was written", started)
            return False
        self._record(StepResult("generate", what, "done", f"{len(frame)} prompts -> {prompts.path}",
                                time.perf_counter() - started))
        return True

    def _template_frame(self, spec: Any) -> Any:
        """A template family's prompts; its mistakes (a count past the family's space, say) as one line
        naming the `prompts.generate` key instead of the command-line flag."""
        try:
            return self._generate_frame(spec)
        except ConfigError as error:
            message = str(error)
            key = next((key for flag, key in (("--count", "count"), ("--min-words", "min_words"),
                                               ("--max-words", "max_words")) if flag in message), None)
            for flag, name in (("--count", "count"), ("--min-words", "min_words"), ("--max-words", "max_words")):
                message = message.replace(f"pass {flag}", f"set {name} to").replace(flag, name)
            raise self.experiment.error(("prompts", "generate", *([key] if key else [])), message) from None

    def _generate_frame(self, spec: Any) -> Any:
        if spec.source == "local":
            from ..questions.local import generate_local

            return generate_local(self._model_path(spec.model), spec.count, spec.seed, prompts=spec.prompts,
                                  max_new_tokens=spec.max_new_tokens or 32,
                                  temperature=1.0 if spec.temperature is None else spec.temperature,
                                  min_words=spec.min_words, max_words=spec.max_words, batch_size=self.config.batch_size,
                                  device=self.config.device)
        if spec.source == "ollama":
            from ..questions.ollama import generate_ollama

            return generate_ollama(spec.ollama_model, spec.count, spec.seed, url=spec.ollama_url, prompts=spec.prompts,
                                   max_new_tokens=spec.max_new_tokens or 256,
                                   temperature=0.8 if spec.temperature is None else spec.temperature,
                                   min_words=spec.min_words, max_words=spec.max_words, timeout=spec.timeout,
                                   retries=spec.retries)
        from ..questions.families import generate_prompts

        tokenizer = self._model_path(spec.tokenizer) if spec.tokenizer else None
        return generate_prompts(spec.source, spec.count, spec.seed, min_words=spec.min_words, max_words=spec.max_words,
                                tokenizer=tokenizer)

    def _model_path(self, source: str) -> str:
        """`tiny:FAMILY` -> the experiment's tiny model folder (built when missing); other sources as they are."""
        if not source.startswith(TINY_PREFIX):
            return source
        family = source[len(TINY_PREFIX):]
        path = tiny_dir(self.experiment, family)
        build_tiny(family, path, self.config.seed)
        return str(path)

    def extract(self, target: RunTarget, prompts: PromptsTarget, frame: Any, document: dict) -> None:
        if target.state == "complete":
            self._record(StepResult("extract", target.name, "skipped", target.why))
            write_run_record(target, document)
            return
        what = f"{target.spec.source} -> {target.path} (layers {target.layers}, pooling {target.pooling})"
        if self.dry_run:
            how = {"resume": target.why, "stale": target.why}.get(target.state, "new run")
            self._record(StepResult("extract", target.name, "planned", f"{what}; {how}"))
            return
        from ..extraction import extract

        started = time.perf_counter()
        try:
            if target.tiny:
                with self._status(f"build tiny {target.tiny} model in {target.model}"):
                    build_tiny(target.tiny, Path(target.model), self.config.seed)
            if self.console is not None:
                self.console.print(f"[bold]extract {target.name}[/]: {what}", highlight=False, soft_wrap=True)
            options = dict(
                layers=target.layers, out=target.path, pooling=target.pooling, format=target.format, dtype=target.dtype,
                batch_size=self.config.batch_size, max_length=self.config.max_length, device=self.config.device,
                model_dtype=self.config.model_dtype, compression=self.config.compression,
                overwrite=target.state == "stale", samples_per_shard=self.config.samples_per_shard,
                progress=self.console is not None, engine=self.engine)
            if self.engine != "local":
                options.update(self.config.ray.model_dump(exclude={"analyses"}))
            source = frame if prompts.limit is not None else prompts.path
            run = extract(target.model, source, text_column=None if prompts.limit is not None else prompts.text_column,
                          **options)
        except KeyboardInterrupt:
            raise
        except Exception as error:
            self._fail("extract", target.name, error, _kept(target), started)
            target.state = "failed"
            with contextlib.suppress(Exception):
                if (target.path / "manifest.json").is_file():
                    write_run_record(target, document)
            return
        write_run_record(target, document)
        shards = len({shard.index for shard in run.manifest.shards})
        status = "resumed" if target.state == "resume" else "done"
        target.state = "complete"
        self._record(StepResult("extract", target.name, status, f"{run.manifest.n_samples} samples, {len(run.layers)} "
                                f"layers, {shards} shard{'s' if shards != 1 else ''}", time.perf_counter() - started))

    def analyze(self, target: RunTarget) -> None:
        steps = self.config.analyses
        if not steps:
            return
        if target.state not in ("complete",) and not self.dry_run:
            self._record(StepResult("analyze", target.name, "skipped", f"{len(steps)} analyses wait for the extraction "
                                    "to complete (re-run to resume it)"))
            return
        for index, step in enumerate(steps):
            layers = analysis_layers(self.experiment, target, index)
            name = f"{step.name} on {target.name}"
            if self.dry_run:
                self._record(StepResult("analyze", name, "planned", f"layers {layers or 'all'}, params {step.params}"
                                        f"{', labels ' + step.labels if step.labels else ''} (reused if computed)"))
                continue
            started = time.perf_counter()
            try:
                from ..analysis.runner import analyze

                with self._status(f"analyze {name}"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # recorded in the artifact; counted below
                    artifact = analyze(target.path, step.name, layers=layers, params=step.params, labels=step.labels,
                                       engine=self._engine(), force=not self.resume)
            except KeyboardInterrupt:
                raise
            except Exception as error:
                self._fail("analyze", name, error, "no artifact written for it; the run and other artifacts are kept",
                           started)
                continue
            self.artifacts.setdefault(target.name, []).append(artifact.id)
            units = len(artifact.units)
            noted = f", {len(artifact.warnings)} warning(s)" if artifact.warnings else ""
            if artifact.reused:
                self._record(StepResult("analyze", name, "skipped", f"artifact {artifact.id} exists"))
            else:
                self._record(StepResult("analyze", name, "done", f"{units} unit(s){noted} -> {artifact.id}",
                                        time.perf_counter() - started))

    def _engine(self) -> Any:
        if self._analysis_engine is None:
            from ..analysis.runner import get_engine

            on_ray = self.engine != "local" and self.config.ray.analyses
            self._analysis_engine = get_engine(self.engine if on_ray else "local")
        return self._analysis_engine

    def report(self, targets: list[RunTarget], document: dict) -> None:
        outputs = self.config.outputs
        if not outputs.report:
            return
        out = self.experiment.out_dir / REPORT_NAME
        if self.dry_run:
            self._record(StepResult("report", str(out), "planned", f"{outputs.reporter} report of every run"))
            return
        runs = [{"name": t.name, "model": t.spec.source, "path": str(t.path), "state": t.state,
                 "artifacts": self.artifacts.get(t.name, [])} for t in targets]
        inputs = digest({"document": document, "runs": runs, "updated": [_updated(t) for t in targets]}, 64)
        state = read_state(self.experiment)
        if self.resume and out.is_file() and state.get("report") == inputs:
            self._record(StepResult("report", str(out), "skipped", "runs and artifacts unchanged since it was written"))
            self.result.report = out
            return
        started = time.perf_counter()
        try:
            writer = load_reporter(outputs.reporter)
        except ReporterUnavailable as error:
            self._record(StepResult("report", str(out), "skipped", f"{error}; the runs and artifacts are complete"))
            return
        summary = {**document, "out_dir": str(self.experiment.out_dir), "engine": self.engine,
                   "runs": runs,
                   "steps": [asdict(step) for step in self.result.steps]}
        try:
            with self._status(f"write the {outputs.reporter} report"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                written = Path(writer(summary, out))
        except KeyboardInterrupt:
            raise
        except Exception as error:
            self._fail("report", str(out), error, "the runs and artifacts are kept", started)
            return
        write_state(self.experiment, {**state, "report": inputs})
        self.result.report = written
        self._record(StepResult("report", str(written), "done", f"{written.stat().st_size / 1e6:.1f} MB",
                                time.perf_counter() - started))


def build_tiny(family: str, path: Path, seed: int) -> Path:
    """Build the tiny random model once; built in a temporary folder and renamed, so never half there."""
    import os
    import shutil

    if (path / "config.json").is_file():
        return path
    from ..models.tiny import make_tiny

    from ..tempfiles import remove_abandoned, temp_path

    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    remove_abandoned(path)  # what a killed build left
    try:
        make_tiny(family, tmp, seed=seed)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _kept(target: RunTarget) -> str:
    """What an interrupted extraction left: committed shards and samples, and how to continue."""
    from ..store.manifest import load_manifest

    try:
        manifest = load_manifest(target.path)
    except Exception:
        return "nothing was written"
    first = next(iter(manifest.layers), None)
    shards = manifest.shards_of(first) if first else []
    samples = sum(shard.samples[1] - shard.samples[0] for shard in shards)
    per_shard = manifest.extra.get("samples_per_shard") or 0
    total = math.ceil(manifest.n_samples / per_shard) if per_shard else "?"
    return (f"kept {len(shards)} of {total} shards ({samples} of {manifest.n_samples} samples) in {target.path}; "
            "re-run the same command to resume")


def _updated(target: RunTarget) -> str | None:
    """When the run's manifest last changed (None: no run there)."""
    from ..store.manifest import load_manifest

    try:
        return load_manifest(target.path).updated
    except Exception:
        return None
