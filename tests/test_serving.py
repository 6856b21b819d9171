"""The served application over real HTTP on a local Ray: the demo's serving step, every
endpoint with and without a key, a bounded fuzz and a bounded concurrent load (zero 5xx),
a model swap under load with no failed request, and real autoscaling of the embedder."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections import Counter

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import MODEL, png_header, search, tiny_demo

from medray.serving import local
from medray.serving.config import Autoscaling, ServeConfig

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer k1"}


@pytest.fixture(scope="module")
def demo(request, tmp_path_factory):
    pytest.importorskip("medray.registry", reason="needs the registry (bundle) module")
    request.getfixturevalue("ray_local")
    return tiny_demo(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def served(demo):
    """`medray demo`'s last step (serve_demo) with MEDRAY_API_KEYS=k1, not blocking."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDRAY_API_KEYS", "k1")
    cfg, result = demo
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        served = local.serve_demo(cfg, result, block=False)
    yield served, out.getvalue()
    local.stop()
    mp.undo()


@pytest.fixture(scope="module")
def query(demo) -> bytes:
    return local.demo_query_image(demo[0].workdir)[2]


def test_demo_prints_url_key_source_and_answer(served):
    s, printed = served
    assert any("http://" in line for line in printed.splitlines()), printed
    assert "MEDRAY_API_KEYS" in printed and "k1" not in printed
    assert "/v1/search" in printed and "-> 200" in printed and "#1 " in printed


def test_three_post_endpoints_answer_with_a_key_and_401_without(served, query, demo):
    url = served[0].url
    resp = search(url, query, k=5)
    assert resp.status_code == 200, resp.text
    hits = resp.json()["neighbors"]
    assert len(hits) == 5 and hits[0]["score"] >= hits[-1]["score"]
    assert all(h["labels"] and h["thumbnail_url"].endswith("/thumbnail") for h in hits)
    resp = requests.post(f"{url}/v1/classify", files={"image": query}, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    tasks = resp.json()["tasks"]
    for out in tasks.values():
        assert set(out["decisions"]) <= set(out["probabilities"])
    files = {"image_a": query, "image_b": query}
    resp = requests.post(f"{url}/v1/compare", files=files, headers=AUTH, timeout=60)
    assert resp.status_code == 200 and resp.json()["similarity"] > 0.99
    assert resp.json()["same_category"] is True
    for path, body in [("search", {"image": query}), ("classify", {"image": query}),
                       ("compare", files)]:  # fmt: skip
        resp = requests.post(f"{url}/v1/{path}", files=body, timeout=60)
        assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"


def test_thumbnail_model_and_health(served, query):
    url = served[0].url
    first = search(url, query, k=1).json()["neighbors"][0]
    thumb = requests.get(url + first["thumbnail_url"], headers=AUTH, timeout=30)
    assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")
    assert requests.get(url + first["thumbnail_url"], timeout=30).status_code == 401
    model = requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
    assert model["name"] == MODEL and model["version"] is not None
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


bodies = st.one_of(
    st.builds(lambda b: {"files": {"image": ("f", b)}}, st.binary(max_size=4096)),
    st.builds(lambda n: {"files": {"image": ("f", png_header(n, n))}}, st.integers(6000, 70000)),
    st.builds(lambda f: {"files": {"image": ("f", f)}}, st.sampled_from(["TRUNC"])),
    st.builds(lambda name: {"files": {name: ("f", b"\x89PNG")}},
              st.text("abcdefgik_-", max_size=12)),
    st.builds(lambda v: {"json": {"image": v}}, st.one_of(st.text(max_size=64), st.integers(),
                                                          st.none(), st.lists(st.integers()))),
    st.builds(lambda k: {"files": {"image": ("f", "QUERY")}, "data": {"k": k}}, st.text(max_size=6)),
    st.builds(lambda b: {"data": b, "headers": {"content-type": "application/json"}},
              st.binary(max_size=512)),
)  # fmt: skip


def materialise(case: dict, query: bytes) -> dict:
    """Put the real query (whole or truncated) where the strategy left a placeholder."""
    files = case.get("files")
    if files and "image" in files and files["image"][1] in ("TRUNC", "QUERY"):
        tag = files["image"][1]
        cut = query[: len(query) // 3] if tag == "TRUNC" else query
        case = {**case, "files": {"image": ("f", cut)}}
    return case


def test_fuzzed_bodies_never_5xx(served, query):
    url = served[0].url
    statuses: Counter[int] = Counter()

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=bodies, endpoint=st.sampled_from(["search", "classify", "compare"]))
    def one(case, endpoint):
        case = materialise(case, query)
        headers = {**AUTH, **case.pop("headers", {})}
        resp = requests.post(f"{url}/v1/{endpoint}", headers=headers, timeout=60, **case)
        statuses[resp.status_code] += 1
        assert resp.status_code < 500, resp.text
        assert resp.headers["content-type"].startswith("application/json")

    one()
    assert search(url, query).status_code == 200  # still answering
    assert statuses[413] + statuses[415] + statuses[422] > 0, statuses


def test_concurrent_load_zero_5xx(served, query):
    url = served[0].url
    b64 = base64.b64encode(query).decode()
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(6):
            if (i + j) % 3 == 0:
                r = requests.post(f"{url}/v1/search", json={"image": b64, "k": 3}, headers=AUTH)
            elif (i + j) % 3 == 1:
                r = requests.post(f"{url}/v1/classify", files={"image": query}, headers=AUTH)
            else:
                r = requests.post(f"{url}/v1/search", files={"image": b"junk"}, headers=AUTH)
            with lock:
                statuses[r.status_code] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert sum(statuses.values()) == 72 and not any(s >= 500 for s in statuses), statuses
    assert statuses[200] == 48 and statuses[415] == 24


def serve_cfg(demo, **changes) -> ServeConfig:
    cfg, _ = demo
    base = ServeConfig(workdir=cfg.workdir, model_name=cfg.model_name, mlflow=cfg.mlflow, ray=cfg.ray, port=0)  # fmt: skip
    return base.model_copy(update=changes)


def test_model_swap_under_load_drops_nothing(served, query, demo):
    """A second version is registered; user_config moves from @production to it while a
    client loops on /v1/search; every request succeeds and both versions answer."""
    from medray.registry import register_and_promote

    cfg, _ = demo
    second = register_and_promote(cfg.workdir, cfg.model_name, cfg)
    version = int(second["version"])
    url = served[0].url
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            r = search(url, query, k=3)
            ok = r.headers.get("content-type", "").startswith("application/json")
            answers.append((r.status_code, r.json().get("model") if ok else r.text[:200]))

    threads = [threading.Thread(target=loop) for _ in range(3)]
    [t.start() for t in threads]
    time.sleep(2)
    local.deploy(serve_cfg(demo, model_version=version), served[0].keys)
    deadline = time.time() + 60
    while time.time() < deadline:
        model = requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
        if model["version"] == version and answers[-1][1].endswith(f"/{version}"):
            break
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    [t.join(timeout=60) for t in threads]
    failed = [a for a in answers if a[0] != 200]
    assert not failed, failed[:3]
    models = Counter(m for _, m in answers)
    assert len(models) == 2 and models[f"{MODEL}/{version}"] > 0, models


def replicas(app: str, name: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[name].replica_states
    return int(states.get("RUNNING", 0))


def test_embedder_autoscales_up_and_back_down(served, query, demo):
    """Short delays: a bounded load takes the embedder from 1 to 2 replicas, and it returns
    to 1 after the load stops (read from serve.status())."""
    cfg = serve_cfg(demo)
    cfg.embedder.autoscaling = Autoscaling(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1,
        upscale_delay_s=1, downscale_delay_s=2, look_back_period_s=2,
    )  # fmt: skip
    version = requests.get(f"{served[0].url}/v1/model", headers=AUTH, timeout=30).json()["version"]
    local.deploy(cfg.model_copy(update={"model_version": version}), served[0].keys)
    app, url = cfg.app_name, served[0].url
    assert replicas(app, "Embedder") == 1
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            assert search(url, query, k=3).status_code == 200

    threads = [threading.Thread(target=loop) for _ in range(8)]
    [t.start() for t in threads]
    try:
        deadline = time.time() + 90
        while time.time() < deadline and replicas(app, "Embedder") < 2:
            time.sleep(0.5)
        assert replicas(app, "Embedder") == 2, "embedder did not scale up under load"
    finally:
        stop.set()
        [t.join(timeout=60) for t in threads]
    deadline = time.time() + 90
    while time.time() < deadline and replicas(app, "Embedder") != 1:
        time.sleep(0.5)
    assert replicas(app, "Embedder") == 1, "embedder did not scale back down"
