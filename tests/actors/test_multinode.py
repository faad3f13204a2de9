"""Multi-node: `--engine ray` on a three-node cluster (`ray.cluster_utils.Cluster`) spreads its workers
over the nodes and writes the same run as the in-process engine.

The cluster lives in a subprocess (`multinode_run.py`) so it never meets the session's `ray_cluster`
connection: tests that run after this one keep using theirs. Its Ray files (sessions, and the
`ray_current_cluster` file that `Cluster` writes for `address="auto"`) go to a temp dir of its own
(RAY_TMPDIR), so `--address auto` elsewhere on the machine never points at this short-lived cluster.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from actorstest_util import PROMPTS, assert_same_run

import neuronmap
from neuronmap.store import open_run, verify_run

SCRIPT = Path(__file__).with_name("multinode_run.py")


def test_workers_spread_over_three_nodes_and_the_run_is_complete_and_exact(gpt2_dir, tmp_path, one_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["RAY_TMPDIR"] = ray_tmp = tempfile.mkdtemp(prefix="nm-nodes-", dir="/tmp")  # short: socket paths
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), gpt2_dir, str(prompts), str(tmp_path / "ray")], env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    nodes, records = report["nodes"], report["records"]
    assert len(nodes) == 3
    # three worker actors, one on each node (0.75 CPU each on 1-CPU nodes: they cannot share one)
    assert sorted(nodes[node] for node in report["worker_nodes"]) == ["node-a", "node-b", "node-head"]
    assert sorted(r["shard"] for r in records) == list(range(len(PROMPTS) // 2))  # every shard exactly once
    assert {r["node"] for r in records} <= set(report["worker_nodes"])  # made by those workers, on their nodes

    local = neuronmap.extract(gpt2_dir, prompts, out=tmp_path / "local", layers="embed,blocks.*",
                              samples_per_shard=2, batch_size=1)
    assert_same_run(open_run(tmp_path / "ray"), local)
    report = verify_run(tmp_path / "ray")
    assert report.ok and not report.warnings
