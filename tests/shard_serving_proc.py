"""Driver for tests/test_shards.py's cluster test, in its own process (the test session may
already run its own local Ray): joins the two-node cluster, serves a sharded bundle (one
Retriever deployment per shard, built by medray.serving.app.retrievers) and an unsharded
one, searches both through medray.serving.backend.HandleBackend, prints one JSON line.

    python tests/shard_serving_proc.py GCS_ADDRESS SHARDED_BUNDLE SINGLE_BUNDLE QUERIES.npy
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np


def main(gcs: str, sharded: str, single: str, queries_path: str) -> dict:
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from medray.serving.app import retrievers
    from medray.serving.backend import HandleBackend
    from medray.serving.config import ServeConfig

    ray.init(address=gcs, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    # One shard per node: each shard replica reserves 60 % of the smaller node's memory.
    memory = min(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"])
    small = {"num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    cfg = ServeConfig(bundle_path=sharded, retriever=small, shard_memory_mb=0.6 * memory / 2**20)
    shard_apps = retrievers(cfg, {"model_uri": sharded, "tracking_uri": None}, 2)
    shards = [serve.run(app, name=f"s{i}", route_prefix=None) for i, app in enumerate(shard_apps)]
    whole_app = retrievers(cfg, {"model_uri": single, "tracking_uri": None}, 1)
    whole = serve.run(whole_app, name="single", route_prefix=None)
    fanned, one = HandleBackend(None, shards, None), HandleBackend(None, whole, None)

    async def ask() -> dict:
        out: dict = {"sharded": [], "single": []}
        for q in np.load(queries_path):
            for k in (1, 5, 12):
                out["sharded"].append(await fanned.search(sharded, q, k))
                out["single"].append(await one.search(single, q, k))
        thumbs = [await b.thumbnail("img017", 24) for b in (fanned, one)]
        out["thumbnail_equal"] = thumbs[0] is not None and thumbs[0] == thumbs[1]
        out["missing_thumbnail"] = await fanned.thumbnail("no-such-image", 24)
        out["info_shards"] = [(await h.info.remote())["shard"] for h in shards]
        return out

    result = asyncio.run(ask())
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    result["shard_nodes"] = {
        a.class_name: a.node_id for a in actors if "Retriever-s" in (a.class_name or "")
    }
    serve.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])), flush=True)
