"""`engine: ray`: the experiment's extraction and analyses run on the session's local Ray cluster."""

from __future__ import annotations

import numpy as np

import neuronmap
from neuronmap.analysis.artifacts import list_artifacts
from neuronmap.experiments import load_experiment, run_experiment


def test_ray_engine_runs_extraction_and_analyses_on_ray(ray_cluster, write_experiment, tmp_path, gpt2_dir):
    text = f"""
    name: on-ray
    prompts: {{file: builtin:questions, limit: 16}}
    model: {gpt2_dir}
    layers: blocks.0,blocks.2
    batch_size: 4
    samples_per_shard: 8
    engine: ray
    ray: {{workers: 1, cpus_per_worker: 1}}
    analyses:
      - name: stats
    outputs: {{dir: {tmp_path / 'ray'}, report: false}}
    """.replace("\n    ", "\n")
    path = write_experiment(text)
    result = run_experiment(load_experiment(path))
    assert not result.failed, [step.line() for step in result.failed]
    assert result.engine == "ray"
    run = neuronmap.open_run(tmp_path / "ray" / "gpt2-seed0")
    (artifact,) = list_artifacts(run.path)
    assert artifact.result["engine"] == "ray"

    # the same experiment on the local engine gives the same rows and statistics
    local_path = write_experiment(text.replace("engine: ray", "engine: local").replace(str(tmp_path / "ray"),
                                                                                       str(tmp_path / "local")),
                                  "local.yaml")
    assert not run_experiment(load_experiment(local_path)).failed
    reference = neuronmap.open_run(tmp_path / "local" / "gpt2-seed0")
    (local_artifact,) = list_artifacts(reference.path)
    assert local_artifact.result["engine"] == "local"
    for layer in reference.layers:
        np.testing.assert_allclose(run.array(layer), reference.array(layer), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(artifact.array("mean", layer), local_artifact.array("mean", layer), rtol=1e-5,
                                   atol=1e-6)
    resolved = (tmp_path / "ray" / "experiment.resolved.yaml").read_text()
    assert "engine: ray" in resolved and "workers: 1" in resolved
