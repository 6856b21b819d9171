"""A throwaway multi-node Ray cluster in its own process, for the cluster tests.

    python tests/ray_cluster_proc.py --head-cpus 2 --node-cpus 1 --nodes 1

Starts a head with the dashboard (Jobs API) plus `--nodes` worker raylets on this
machine with `ray.cluster_utils.Cluster`, prints one JSON line (dashboard URL, GCS
address, node ids), then waits until its stdin closes and shuts every process down.
Running in its own process keeps it apart from the test session's `ray_local`, and
RAY_TMPDIR keeps its address file away from other Ray users on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(head_cpus: float, node_cpus: float, nodes: int):
    from ray.cluster_utils import Cluster

    head_args = {
        "num_cpus": head_cpus,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "object_store_memory": 200 * 1024 * 1024,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    for i in range(nodes):
        cluster.add_node(
            num_cpus=node_cpus,
            # Raylets on one machine share the session dir: each needs its own runtime-env
            # dir, or one node's cleanup deletes a working_dir another node's job runs in.
            runtime_env_dir_name=f"runtime_resources_node{i + 1}",
            object_store_memory=150 * 1024 * 1024,
            dashboard_agent_listen_port=free_port(),
            metrics_export_port=free_port(),
        )
    cluster.wait_for_nodes()
    return cluster, head_args["dashboard_port"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-cpus", type=float, default=2)
    parser.add_argument("--node-cpus", type=float, default=1)
    parser.add_argument("--nodes", type=int, default=0)
    args = parser.parse_args()
    # A short path: Ray's socket paths under it must stay below the 107-byte limit.
    tmpdir = tempfile.mkdtemp(prefix="mr-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmpdir
    cluster, port = start(args.head_cpus, args.node_cpus, args.nodes)
    try:
        info = {
            "dashboard": f"http://127.0.0.1:{port}",
            "gcs": cluster.address,
            "head_node_id": cluster.head_node.node_id,
            "node_ids": [n.node_id for n in cluster.list_all_nodes()],
            "tmpdir": os.environ["RAY_TMPDIR"],
        }
        print(json.dumps(info), flush=True)
        sys.stdin.read()  # the test closes our stdin to stop us
    finally:
        cluster.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
