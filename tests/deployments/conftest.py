"""Serve fixtures: one Serve instance on the session's Ray (127.0.0.1, a free port), two apps on it.

- `open_app` (route prefix `/`): the tiny GPT-2 served as `tiny`, no API keys (loopback default), audit file;
- `guarded_app` (route prefix `/guarded`): no model, API keys from a key file, 60 requests a minute
  per key with bursts of 5, a 4 KiB body limit.

Both serve `serve_runs`: a run made with `neuronmap.extract` plus a `stats` artifact made with
`neuronmap.analysis.analyze`, and links that point out of the runs directory (which must stay unseen).
"""

from __future__ import annotations

import shutil
import socket
from types import SimpleNamespace

import pandas as pd
import pytest

TEXTS = ["The cat sat on the mat.", "Dogs bark at night.", "What is the capital of France?",
         "Paris is the capital of France.", "I love this movie!", "This film was terrible.",
         "Why is the sky blue?", "Rain falls from clouds."]
LABELS = ["animal", "animal", "geo", "geo", "film", "film", "science", "science"]
KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key", "carol": "carol-secret-key"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("gpt2"))


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory, serve_model):
    import neuronmap
    from neuronmap.analysis import analyze

    root = tmp_path_factory.mktemp("serve")
    runs = root / "runs"
    runs.mkdir()
    frame = pd.DataFrame({"text": TEXTS, "topic": LABELS})
    neuronmap.extract(serve_model, frame, layers="blocks.*", out=runs / "demo", pooling="mean", samples_per_shard=3)
    artifact = analyze(runs / "demo", "stats", layers="blocks.*")
    # A run outside the runs directory, reachable only through a symlink: must stay unseen.
    shutil.copytree(runs / "demo", root / "outside-run")
    (runs / "escape").symlink_to(root / "outside-run", target_is_directory=True)
    shutil.copytree(artifact.path, root / "outside-artifact")
    (runs / "demo" / "analyses" / "stats-escape").symlink_to(root / "outside-artifact", target_is_directory=True)
    return SimpleNamespace(root=root, runs=runs, run_id="demo", artifact=artifact, texts=TEXTS)


@pytest.fixture(scope="session")
def serve_base(ray_cluster):
    from deployments import options

    port = free_port()
    options.start("127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    options.shutdown()


@pytest.fixture(scope="session")
def open_app(serve_base, serve_runs, serve_model):
    from deployments import options
    from deployments.app import build_app

    audit = serve_runs.root / "audit.log"
    app = build_app({"runs_dir": str(serve_runs.runs), "models": [f"tiny={serve_model}"], "audit_log": str(audit),
                     "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}})
    options.run(app, name="open", route_prefix="/", timeout_s=180)
    yield SimpleNamespace(url=serve_base, audit=audit, model="tiny")
    options.delete("open")


@pytest.fixture(scope="session")
def guarded_app(serve_base, serve_runs):
    from deployments import options
    from deployments.app import build_app

    key_file = serve_runs.root / "keys.txt"
    key_file.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    app = build_app({"runs_dir": str(serve_runs.runs), "api_keys_file": str(key_file), "rate_limit_per_minute": 60,
                     "rate_limit_burst": 5, "limits": {"max_body_bytes": 4096}})
    options.run(app, name="guarded", route_prefix="/guarded", timeout_s=180)
    yield SimpleNamespace(url=f"{serve_base}/guarded", keys=KEYS)
    options.delete("guarded")
