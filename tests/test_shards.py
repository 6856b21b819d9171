"""medray.index.shards: the top-k merge, a sharded build + load equal to the unsharded
search (exact Flat), refusal of an altered shard, and sharded serving on a two-node cluster
answering exactly what unsharded serving answers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_index import BID, config, fake_embeddings

from medray import index as I
from medray import storage
from medray.index import shards as S


def test_merge_topk_orders_by_score_then_row_and_pads():
    a = (np.array([[0.9, 0.5, 0.1]]), np.array([[3, 0, 1]]))
    b = (np.array([[0.9, 0.7, -np.inf]]), np.array([[10, 12, -1]]))
    scores, rows = S.merge_topk([a, b], 4)
    assert rows.tolist() == [[3, 10, 12, 0]]  # 0.9 tie: lower global row first
    assert scores[0].tolist() == pytest.approx([0.9, 0.9, 0.7, 0.5])
    scores, rows = S.merge_topk([(np.array([[0.2]]), np.array([[7]]))], 3)
    assert rows.tolist() == [[7, -1, -1]] and np.isneginf(scores[0, 1:]).all()
    assert S.shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="shards"):
        S.shard_ranges(2, 3)


def test_merge_hits_keeps_vectors_with_their_hits():
    def hit(row, score):
        return {"id": f"img{row}", "score": score, "labels": [], "uri": "", "row": row}

    a = {"hits": [hit(1, 0.8), hit(0, 0.3)], "vectors": np.array([[1.0, 0.0]], np.float32)}
    b = {"hits": [hit(5, 0.9)], "vectors": np.array([[0.0, 1.0]], np.float32)}
    hits, vectors = S.merge_hits([a, b], 2)
    assert [h["row"] for h in hits] == [5, 1]
    assert vectors.tolist() == [[0.0, 1.0], [1.0, 0.0]]


@pytest.fixture(scope="module")
def flat_pair(tmp_path_factory):
    """The same 301 vectors indexed exactly, once whole and once as 3 shards."""
    root = tmp_path_factory.mktemp("shards")
    x = fake_embeddings(str(root / "one"), n=301, dim=16)
    fake_embeddings(str(root / "three"), n=301, dim=16)
    one = I.build(config(str(root / "one"), factory="Flat"))
    three = I.build(config(str(root / "three"), factory="Flat", shards=3))
    return x, one, three


def test_sharded_build_and_load_equal_unsharded(flat_pair):
    x, one, three = flat_pair
    assert (three.shards, three.count, one.shards) == (3, 301, 1)
    meta = json.loads(open(storage.join(three.out_dir, "index.json")).read())
    assert meta["layout"]["kind"] == "sharded"
    assert [(e["start"], e["stop"]) for e in meta["layout"]["shards"]] == [
        (0, 100), (100, 200), (200, 301)
    ]  # fmt: skip
    assert set(meta["files"]) == {f"shard-0000{i}/index.json" for i in range(3)}
    a = I.load_index(one.out_dir, expect_dim=16, expect_backbone_id=BID)
    b = I.load_index(three.out_dir, expect_dim=16, expect_backbone_id=BID)
    q = x[::7] + 0.01  # queries that are not gallery rows
    for k in (1, 10, 120):
        sa, ra = a.search(q, k)
        sb, rb = b.search(q, k)
        assert (ra == rb).all() and np.allclose(sa, sb, atol=1e-6), k
    for v in x[:5]:  # one query at a time, as serving sends them: bit-identical scores
        assert [t.tolist() for t in a.search(v, 10)] == [t.tolist() for t in b.search(v, 10)]
    train = np.nonzero(a.column("split") == "train")[0]
    sa, ra = a.search(q, 10, allowed_rows=train)
    sb, rb = b.search(q, 10, allowed_rows=train)
    assert (ra == rb).all() and np.isin(rb, train).all()
    assert b.gallery["id"].tolist() == a.gallery["id"].tolist()
    assert np.allclose(b.vectors(np.array([0, 150, 300])), x[[0, 150, 300]])
    one_shard = S.load_shard(three.out_dir, 1)
    assert one_shard.gallery["id"].tolist()[0] == "img100"
    assert b.loaded.keys() >= {0, 1, 2}


def test_altered_shard_refused(tmp_path):
    fake_embeddings(str(tmp_path), n=60, dim=16)
    out = I.build(config(str(tmp_path), factory="Flat", shards=2)).out_dir
    shard_meta = tmp_path / "index" / BID / "shard-00001" / "index.json"
    shard_meta.write_text(shard_meta.read_text().replace('"count": 30', '"count": 31'))
    with pytest.raises(I.IndexMismatch, match="altered file"):
        I.load_index(out)
    with pytest.raises(I.IndexMismatch, match="no shard 5"):
        S.load_shard(out, 5)


def test_fan_out_answers_equal_unsharded_search_with_query_expansion(flat_pair):
    """What the ingress does with the shard retrievers' answers (no Ray): merged hits, and
    alpha-QE in two rounds, equal one index's search (medray.adapt.search.index_search)."""
    from medray.adapt.search import index_search

    x, one, three = flat_pair
    a, b = I.load_index(one.out_dir), I.load_index(three.out_dir)
    for q in x[:4] + 0.01:
        first = [S.shard_answer(b, i, q, 10, 2) for i in range(3)]
        hits, _ = S.merge_hits(first, 10)
        assert [h["row"] for h in hits] == a.search(q, 10)[1][0].tolist()
        top, vectors = S.merge_hits(first, 2)
        expanded = S.expanded_query(q, top, vectors, 2, 3.0)
        hits, _ = S.merge_hits([S.shard_answer(b, i, expanded, 10) for i in range(3)], 10)
        want_scores, want_rows = index_search(a, q[None], 10, 2, 3.0)
        assert [h["row"] for h in hits] == want_rows[0].tolist()
        assert [h["score"] for h in hits] == pytest.approx(want_scores[0].tolist(), abs=1e-6)
        assert hits[0]["id"] == f"img{want_rows[0][0]}"


def test_compose_binds_one_retriever_per_shard():
    """The app builder: Retriever-s0/s1 with the shard in user_config, memory reserved,
    both handed to the ingress as one list (Serve turns it into a list of handles)."""
    from medray.serving.app import compose
    from medray.serving.config import ServeConfig
    from medray.serving.security import KeySet

    cfg = ServeConfig(bundle_path="/nowhere", shard_memory_mb=100)
    app = compose(cfg, KeySet(digests=("d",), source="test", local_key=None), shards=2)
    shard_apps = app._bound_deployment.init_args[1]
    deployments = [a._bound_deployment for a in shard_apps]
    assert [d.name for d in deployments] == ["Retriever-s0", "Retriever-s1"]
    assert [d._deployment_config.user_config["shard"] for d in deployments] == [0, 1]
    assert deployments[0].ray_actor_options["memory"] == 100 * 2**20
    single = compose(cfg, KeySet(digests=("d",), source="test", local_key=None), shards=1)
    assert single._bound_deployment.init_args[1]._bound_deployment.name == "Retriever"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Two bundles of one 30-image workdir: its exact index whole, and split in 2 shards."""
    from registry_parts import make_workdir

    from medray.config import MlflowConfig
    from medray.embed import read_embeddings
    from medray.registry import build_bundle

    root = tmp_path_factory.mktemp("shard-bundles")
    make_workdir(root / "wd", n=30)
    build_bundle(str(root / "wd"), str(root / "single"))
    cfg = I.Config(workdir=str(root / "wd"), factory="Flat", shards=2, mlflow=MlflowConfig())
    assert I.build(cfg).shards == 2
    build_bundle(str(root / "wd"), str(root / "sharded"))
    bid = (root / "wd" / "embeddings" / "LATEST").read_text().strip()
    _, x = read_embeddings(str(root / "wd"), bid)
    q = x[[0, 7, 16, 29]] + np.random.default_rng(0).normal(0, 0.02, (4, x.shape[1]))
    np.save(root / "queries.npy", (q / np.linalg.norm(q, axis=1, keepdims=True)).astype("f4"))
    return root


@pytest.mark.integration
def test_sharded_serving_equals_unsharded_on_two_nodes(two_nodes, bundles):
    """One Retriever deployment per shard, one shard per node (memory reserved), searched
    by the ingress's fan-out: the same neighbours and scores as the unsharded bundle."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_TMPDIR": two_nodes["tmpdir"]}
    args = [two_nodes["gcs"], bundles / "sharded", bundles / "single", bundles / "queries.npy"]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("shard_serving_proc.py")), *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sharded"] == out["single"]
    assert [len(hits) for hits in out["single"][:3]] == [1, 5, 12]
    assert out["thumbnail_equal"] and out["missing_thumbnail"] is None
    assert out["info_shards"] == [0, 1]
    assert len(out["shard_nodes"]) == 2
    assert set(out["shard_nodes"].values()) == set(two_nodes["node_ids"]), out["shard_nodes"]
