"""Run one `--engine ray` extraction on a three-node Ray cluster started here; print what ran where.

Used by test_multinode.py in a subprocess: `ray.cluster_utils.Cluster` needs a process that is not
connected to another Ray (the test session keeps its own `ray_cluster` connected), and a subprocess
tears the three nodes down with it whatever happens.

usage: python multinode_run.py MODEL_DIR PROMPTS_FILE OUT_DIR    (one JSON line on stdout)

Nodes: a head and two more, one logical CPU each and a custom resource naming the node. Workers
reserve 0.75 CPU, so at most one worker fits a node and three workers are necessarily on three
nodes; the remaining 0.25 CPU per node runs the tokenising tasks. The pool waits for its three
workers before the first shard is handed out. Where each worker actor lived comes from Ray's state
API (the head runs the dashboard for it), where each shard was made from the workers' records.
Which worker gets how many shards is up to Ray Data (it prefers the worker next to the tokenised
data, and a tiny model finishes a shard before the next one is tokenised), so the test only asks
that every shard was made on one of the cluster's nodes, once.
"""

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(model: str, prompts: str, out: str) -> None:
    import ray.data
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from actors.engine import run_ray_extraction

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "resources": {"node-head": 1}, "include_dashboard": True,
                                      "dashboard_port": 0})
    try:
        nodes = {cluster.head_node.node_id: "node-head"}
        for name in ("node-a", "node-b"):
            nodes[cluster.add_node(num_cpus=1, resources={name: 1}).node_id] = name
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)  # the engine joins this connection (same cluster as --address)
        ray.data.DataContext.get_current().wait_for_min_actors_s = 120
        records = []
        run_ray_extraction(model=model, prompts=prompts, out=out, layers="embed,blocks.*", samples_per_shard=2,
                           batch_size=1, workers=3, cpus_per_worker=0.75, address=cluster.address,
                           on_shard=records.append)
        workers = [actor.node_id for actor in list_actors(limit=1000) if "ExtractionWorker" in actor.class_name]
        print(json.dumps({"nodes": nodes, "worker_nodes": workers,
                          "records": [{k: r[k] for k in ("shard", "node", "pid", "paths")} for r in records]}),
              flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
