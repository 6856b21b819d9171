"""Retrieval adapters: the math (whitening, projection head, losses, query expansion), the
adapt stage on a real workdir, and a bundle with an adapter serving what evaluation found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medray import storage
from medray import workdir as wd
from medray.adapt import fit as F
from medray.adapt.adapter import AdapterError, load_adapter, save_adapter, whitening_adapter
from medray.adapt.search import exact_top_k, index_search, search_space


def clustered(n: int, dim: int, seed: int, minority: float = 0.1, signal: float = 0.6):
    """Two classes told apart by one weak direction under strong shared noise (9:1)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < minority).astype(np.int64)
    x = rng.normal(0, 1, (n, dim)) * np.linspace(3, 0.5, dim)  # a few loud nuisance axes
    x[:, -1] += signal * (2 * y - 1)
    return F.l2_normalize(x + 5.0), y  # + offset: everything shares one direction, like images


def p_at_5(q, yq, g, yg) -> float:
    _, rows = exact_top_k(q, g, 5)
    return float((yg[rows] == yq[:, None]).mean())


# ---------------------------------------------------------------- math


def test_whitening_gives_identity_covariance():
    x, _ = clustered(400, 16, 0)
    mean, proj = F.fit_whitening(x, dim=None, shrinkage=0.0)
    z = (x - mean) @ proj
    np.testing.assert_allclose(np.cov(z.T), np.eye(proj.shape[1]), atol=1e-3)
    mean, proj = F.fit_whitening(x, dim=8)
    assert proj.shape == (16, 8)
    np.testing.assert_allclose(np.linalg.norm(F.apply_linear(x, mean, proj), axis=1), 1, atol=1e-5)


def test_whitening_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        F.fit_whitening(np.ones((1, 4), np.float32))


def test_projection_head_separates_what_raw_cosine_does_not():
    x, y = clustered(600, 24, 1, signal=2.0)
    xq, yq = clustered(200, 24, 2, signal=2.0)
    head, mean = F.fit_projection(x, y, out_dim=8, hidden=32, epochs=40, batch_size=64, seed=0)
    z, zq = F.apply_projection(x, head, mean), F.apply_projection(xq, head, mean)
    assert z.shape == (600, 8)
    np.testing.assert_allclose(np.linalg.norm(zq, axis=1), 1, atol=1e-5)
    raw, adapted = p_at_5(xq, yq, x, y), p_at_5(zq, yq, z, y)
    assert adapted > raw + 0.05 and adapted > 0.95, (raw, adapted)
    again, _ = F.fit_projection(x, y, out_dim=8, hidden=32, epochs=40, batch_size=64, seed=0)
    np.testing.assert_allclose(F.apply_projection(xq, again, mean), zq, atol=1e-6)  # seeded


def test_projection_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        F.fit_projection(np.random.rand(10, 4), np.zeros(10, np.int64))


def test_losses_prefer_clustered_embeddings():
    g = torch.tensor([0, 0, 1, 1])
    tight = torch.nn.functional.normalize(
        torch.tensor([[1, 0.0], [1, 0.1], [0, 1], [0.1, 1]]), dim=1
    )
    mixed = torch.nn.functional.normalize(
        torch.tensor([[1, 0.0], [0, 1], [1, 0.1], [0.1, 1]]), dim=1
    )
    assert F.supcon_loss(tight, g) < F.supcon_loss(mixed, g)
    proxies = torch.tensor([[1.0, 0], [0, 1]])
    assert F.proxy_loss(tight, g, proxies, 10, False) < F.proxy_loss(mixed, g, proxies, 10, False)
    multi = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    assert F.proxy_loss(tight, multi, proxies, 10, True) < F.proxy_loss(
        mixed, multi, proxies, 10, True
    )


def test_balanced_batch_draws_every_class_equally():
    groups = np.array([0] * 90 + [1] * 10)
    batch = F.balanced_batch(groups, 40, np.random.default_rng(0))
    assert len(batch) == 40 and (groups[batch] == 1).sum() == 20
    g = F.label_groups(np.array([[1, 0], [0, 1], [1, 0]]))
    assert g[0] == g[2] != g[1]


def test_query_expansion_weights_by_similarity():
    q = np.array([[1.0, 0.0]], np.float32)
    neigh = np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32)
    # the orthogonal neighbour has similarity 0: it adds nothing
    np.testing.assert_allclose(F.expand_queries(q, neigh, np.array([[0.0, 1.0]])), q, atol=1e-6)
    out = F.expand_queries(q, neigh, np.array([[1.0, 1.0]]))
    np.testing.assert_allclose(out, [[2 / np.sqrt(5), 1 / np.sqrt(5)]], atol=1e-6)
    same = F.expand_queries(q, neigh, np.array([[-np.inf, -np.inf]]))  # padding rows
    np.testing.assert_allclose(same, q)


def test_search_space_is_exact_and_index_search_matches_it():
    import faiss

    from medray.index import GalleryIndex

    rng = np.random.default_rng(3)
    g = F.l2_normalize(rng.normal(size=(200, 16)))
    q = F.l2_normalize(rng.normal(size=(20, 16)))
    scores, rows = search_space(q, g, 5)
    brute = np.argsort(-(q @ g.T), axis=1)[:, :5]
    np.testing.assert_array_equal(rows, brute)
    index = faiss.IndexFlatIP(16)
    index.add(g)
    gi = GalleryIndex(index=index, gallery=None, meta={"dim": 16})
    for qe in (0, 3):
        want = search_space(q, g, 5, qe, 3.0)
        got = index_search(gi, q, 5, qe, 3.0)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_adapter_roundtrip_and_tamper_check(tmp_path):
    x, _ = clustered(100, 8, 4)
    mean, proj = F.fit_whitening(x, dim=4)
    adapter = whitening_adapter(mean, proj, {"source_backbone_id": "bb-0123456789"})
    assert adapter.meta["space_id"].startswith("bb-0123456789.whiten-")
    save_adapter(adapter, str(tmp_path))
    loaded = load_adapter(str(tmp_path))
    np.testing.assert_allclose(loaded.apply(x), adapter.apply(x))
    with pytest.raises(ValueError, match=r"expects \(N, 8\)"):
        loaded.apply(x[:, :4])
    meta = storage.read_json(str(tmp_path / "adapter.json"))
    meta["sha256"] = "0" * 64
    storage.write_json(str(tmp_path / "adapter.json"), meta)
    with pytest.raises(AdapterError, match="do not match"):
        load_adapter(str(tmp_path))


def test_split_pair_accuracy_uses_disjoint_halves():
    from medray.adapt import split_pair_accuracy

    x, y = clustered(300, 8, 5, minority=0.5, signal=5.0)
    labels = np.stack([y == 0, y == 1], 1)
    acc = split_pair_accuracy(F.l2_normalize(x - x.mean(0)), labels, 400, 0)
    assert 0.8 < acc <= 1.0


# ---------------------------------------------------------------- the stage and the bundle


@pytest.fixture(scope="module")
def adapted_workdir(tmp_path_factory):
    """A real workdir (images, bundled-backbone embeddings), adapted, indexed and evaluated."""
    from registry_parts import write_embeddings, write_images

    from medray import adapt, evaluate
    from medray import index as I

    root = tmp_path_factory.mktemp("adapt")
    frame = write_images(root, 48)
    spec, _ = write_embeddings(root, frame, "bundled", 0)
    cfg = adapt.Config(workdir=str(root), candidates=["none", "projection"],
                       query_expansion=[2], metric="p@5",
                       projection={"epochs": 5, "hidden": 64, "out_dim": 16, "batch_size": 24})  # fmt: skip
    result = adapt.run(cfg)
    I.build(I.Config(workdir=str(root)))
    metrics, _, gi = evaluate.evaluate(evaluate.Config(workdir=str(root), min_queries=5), False)
    storage.write_json(storage.join(wd.eval_dir(str(root)), "metrics.json"), metrics)
    return root, frame, spec, result, gi


def test_adapt_stage_writes_the_winners_space(adapted_workdir):
    root, frame, spec, result, _ = adapted_workdir
    assert result.backbone_id == spec.backbone_id
    assert {r["candidate"] for r in result.ranking} == {"none", "projection+qe2"}
    latest = (root / "embeddings" / "LATEST").read_text().strip()
    assert latest == result.space_id
    if result.winner == "none":
        assert latest == spec.backbone_id
        pytest.skip("the projection did not win on this tiny set; nothing more to check")
    summary = storage.read_json(str(root / "embeddings" / latest / "embed.json"))
    assert summary["dim"] == 16 and summary["source_backbone_id"] == spec.backbone_id
    assert summary["adapter"]["query_expansion"]["n"] == 2
    ranking = storage.read_json(str(root / "adapt" / "ranking.json"))
    assert ranking["winner"] == result.winner and ranking["mlflow_run_id"]
    # re-running adapts the backbone's embeddings again, not the adapted ones
    from medray import adapt

    assert adapt.source_backbone_id(str(root), None) == spec.backbone_id


def test_adapt_refuses_to_score_on_test(tmp_path):
    from medray import adapt

    with pytest.raises(ValueError, match="never|must not be test"):
        adapt.evaluate_candidates(
            adapt.Config(workdir=str(tmp_path), score_split="test"), None, None, None, False, {}
        )


def test_bundle_with_adapter_serves_what_evaluation_found(adapted_workdir, tmp_path):
    from PIL import Image

    from medray import evaluate
    from medray.embed import read_embeddings
    from medray.registry.bundle import build_bundle, load_bundle

    root, frame, spec, result, gi = adapted_workdir
    manifest = build_bundle(str(root), str(tmp_path / "bundle"))
    bundle = load_bundle(str(tmp_path / "bundle"))
    rows, x = read_embeddings(str(root))
    queries = np.flatnonzero(rows["split"].to_numpy() == "test")
    images = [np.asarray(Image.open(u).convert("RGB")) for u in rows["uri"].iloc[queries]]
    served = bundle.embed(images)
    assert served.shape[1] == manifest["dim"] == x.shape[1]
    np.testing.assert_allclose(served, x[queries], atol=1e-5)  # backbone + adapter = stored
    if result.winner != "none":
        assert manifest["adapter"]["kind"] == "projection"
        assert bundle.query_expansion == (2, 3.0)
    hits = bundle.search(served, 6)
    retriever = load_bundle(str(tmp_path / "bundle"), parts=["index"])  # QE from the manifest
    assert retriever.query_expansion == bundle.query_expansion
    assert retriever.search(served, 6) == hits
    _, want = evaluate.search(gi, x, "leave-one-out", queries, np.arange(len(x)), 5,
                              gi.meta["_qe"])  # fmt: skip
    for q, got, expected in zip(queries, hits, want, strict=True):
        ids = [h["id"] for h in got if h["id"] != rows["id"].iloc[q]][:5]
        assert ids == [rows["id"].iloc[r] for r in expected]


def test_pick_prefers_the_simplest_within_tolerance():
    from medray.adapt import pick, rank

    rows = rank([{"candidate": "none", "map@10": 0.90}, {"candidate": "projection", "map@10": 0.96},
                 {"candidate": "projection+qe2", "map@10": 0.962}, {"candidate": "x", "error": "e"}],
                "map@10")  # fmt: skip
    assert rows[0]["candidate"] == "projection+qe2" and rows[-1]["candidate"] == "x"
    assert pick(rows, "map@10", 0.005)["candidate"] == "projection"
    assert pick(rows, "map@10", 0.0)["candidate"] == "projection+qe2"
    assert pick([{"candidate": "x", "error": "e", "order": 0}], "map@10", 0.0) is None
