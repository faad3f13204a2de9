"""Every Ray Serve option the NeuronMap application uses, in one module (pinned ray==2.60.0).

Serve's options move between releases (`max_ongoing_requests` replaced `max_concurrent_queries`;
`serve.ingress()` without an app and `__serve_build_asgi_app__` are recent; the default of
`max_ongoing_requests` dropped from 100 to 5). The rest of `deployments` never spells a Serve option
itself: it calls the functions here, so a Ray upgrade is one file to read.

Deployment names are stable, so a `serve_config.yaml` can override any of them by name:
`NeuronMapIngress`, `AnalysisJobs` and `model-<name>` (one per served model, see `model_deployment_name`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .settings import ServeSettings

RAY_VERSION = "2.60.0"
APP_NAME = "neuronmap"
INGRESS_NAME = "NeuronMapIngress"
JOBS_NAME = "AnalysisJobs"

# The ingress only parses requests and awaits the model replicas: it must accept many requests at
# once (Serve's default of 5 would cap every model batch at 5) and needs little CPU.
INGRESS_MAX_ONGOING = 512
INGRESS_ACTOR_OPTIONS = {"num_cpus": 0.25}
# The job runner holds job state in memory: exactly one replica. Analyses run on its threads.
JOBS_ACTOR_OPTIONS = {"num_cpus": 0.5}
JOBS_MAX_ONGOING = 256
# A model replica must hold enough requests in flight for `@serve.batch` to fill its batches.
MODEL_MIN_ONGOING = 128
# Model batches in flight per model replica (from each ingress replica): 2 lets the next batch travel
# while the model computes the current one.
BATCHES_PER_MODEL_REPLICA = 2
# How long the CLI waits for replicas to come up before `serve.run` gives up.
START_TIMEOUT_S = 300


def model_deployment_name(model: str, taken: set[str] | None = None) -> str:
    """`model-<last path part, [A-Za-z0-9_-] only>`, made unique against `taken`."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(str(model).rstrip("/")).name).strip("-") or "model"
    name, counter = f"model-{stem}", 2
    while taken is not None and name in taken:
        name, counter = f"model-{stem}-{counter}", counter + 1
    return name


def ingress_options(settings: ServeSettings) -> dict[str, Any]:
    ongoing = max(INGRESS_MAX_ONGOING, settings.batching.max_batch_size * concurrent_batches(settings))
    return dict(name=INGRESS_NAME, num_replicas=settings.ingress_replicas, max_ongoing_requests=ongoing,
                ray_actor_options=dict(INGRESS_ACTOR_OPTIONS))


def jobs_options(settings: ServeSettings) -> dict[str, Any]:
    return dict(name=JOBS_NAME, num_replicas=1, max_ongoing_requests=JOBS_MAX_ONGOING,
                ray_actor_options=dict(JOBS_ACTOR_OPTIONS))


def model_options(settings: ServeSettings, name: str) -> dict[str, Any]:
    """Replicas (fixed or autoscaled), CPUs/GPUs per replica, requests in flight of a model deployment."""
    actor = {"num_cpus": settings.model_num_cpus}
    if settings.model_num_gpus:
        actor["num_gpus"] = settings.model_num_gpus
    ongoing = max(MODEL_MIN_ONGOING, 4 * settings.batching.max_batch_size)
    options: dict[str, Any] = dict(name=name, max_ongoing_requests=ongoing, ray_actor_options=actor)
    if settings.model_autoscaling:
        options["autoscaling_config"] = dict(settings.model_autoscaling)
    else:
        options["num_replicas"] = settings.model_replicas
    return options


def concurrent_batches(settings: ServeSettings) -> int:
    """Model batches one ingress replica keeps in flight per model: the setting, else BATCHES_PER_MODEL_REPLICA
    per model replica."""
    if settings.batching.max_concurrent_batches:
        return settings.batching.max_concurrent_batches
    replicas = settings.model_replicas
    if settings.model_autoscaling:
        replicas = int(settings.model_autoscaling.get("max_replicas") or replicas)
    return max(1, BATCHES_PER_MODEL_REPLICA * replicas)


def http_options(host: str, port: int) -> dict[str, Any]:
    return {"host": host, "port": int(port)}


def start(host: str, port: int) -> None:
    """Start Serve on the connected Ray cluster with its HTTP proxy on host:port (head node only)."""
    from ray import serve

    serve.start(http_options=http_options(host, port), proxy_location="HeadOnly")


def run(app: Any, name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = START_TIMEOUT_S) -> Any:
    """Deploy `app` and wait until its replicas are up; returns the ingress handle.

    `serve.run` waits without a bound (a replica that cannot be placed or keeps failing to start
    waits forever), so it runs on a helper thread: after `timeout_s` a TimeoutError names the
    deployments that are not running and Serve's message about each.
    """
    import threading

    from ray import serve

    outcome: dict[str, Any] = {}

    def deploy() -> None:
        try:
            outcome["handle"] = serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=deploy, name=f"serve-run-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"Serve application {name!r} is not running after {timeout_s:g} s: {app_status(name)}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["handle"]


def app_status(name: str = APP_NAME) -> str:
    """One line per deployment of application `name`: status, replica states, Serve's message."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception as error:  # noqa: BLE001 - a diagnostic must not raise
        return f"(status unavailable: {error})"
    if app is None:
        return "(no such application)"
    parts = [f"{deployment}: {state.status.value} {dict(state.replica_states)} {state.message}".strip()
             for deployment, state in app.deployments.items()]
    return f"{app.status.value} {app.message}".strip() + ("; " + "; ".join(parts) if parts else "")


def delete(name: str = APP_NAME) -> None:
    from ray import serve

    serve.delete(name)


def shutdown() -> None:
    from ray import serve

    serve.shutdown()


def parse_deploy_config(data: dict[str, Any]) -> Any:
    """A `serve deploy` config validated by Serve's own schema (ServeDeploySchema)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(data)
