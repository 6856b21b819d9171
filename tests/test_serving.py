"""The served application over real HTTP on a local Ray: the demo's serving step, every
endpoint with and without a key, a bounded fuzz and a bounded concurrent load (zero 5xx),
a model swap under load with no failed request, and real autoscaling of the embedder."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import MODEL, Clients, png_header, search, tiny_demo

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


def medray_series(port: int) -> list[str]:
    """The ray_medray_* sample lines on Ray's Prometheus endpoint."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [line for line in text.splitlines() if line.startswith("ray_medray_")]


def search_200s(lines: list[str]) -> float:
    """Requests counted for /v1/search with status 200 (summed over replicas)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("ray_medray_requests_total")
               and 'endpoint="/v1/search"' in line and 'status="200"' in line)  # fmt: skip


def test_prometheus_endpoint_has_medray_metrics(served, query):
    import ray

    # The port of the Ray serving now (the session's, or one a test restarted): Ray says it.
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    url = served[0].url
    before = search_200s(medray_series(port))
    for _ in range(3):
        assert search(url, query, k=3).status_code == 200
    assert requests.post(f"{url}/v1/search", files={"image": query}, timeout=60).status_code == 401
    want = ("ray_medray_requests_total", "ray_medray_request_latency_ms_bucket",
            "ray_medray_model_version", "ray_medray_embed_batch_size", "ray_medray_gallery_size")  # fmt: skip
    deadline = time.time() + 60  # pushed every RAY_metrics_report_interval_ms (2 s in tests)
    while True:
        lines = medray_series(port)
        done = all(any(line.startswith(n) for line in lines) for n in want)
        if (done and search_200s(lines) >= before + 3) or time.time() > deadline:
            break
        time.sleep(1)
    for name in want:
        assert any(line.startswith(name) for line in lines), (name, lines)
    counted = [line for line in lines if line.startswith("ray_medray_requests_total")]
    assert search_200s(lines) >= before + 3, counted
    assert any('status="401"' in line for line in counted), counted
    version = [line for line in lines if line.startswith("ray_medray_model_version")]
    assert any(f'model="{MODEL}"' in line and 'deployment="Embedder"' in line for line in version)


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


class _Clients:
    """The futures of `client_threads`; `alive()` is False once any client has ended (an
    exception, most likely), so a wait loop can stop early and let the exit report it."""

    def __init__(self, futures: list[Future]) -> None:
        self.futures = futures

    def alive(self) -> bool:
        return not any(f.done() for f in self.futures)


@contextlib.contextmanager
def client_threads(n: int, loop, stop: threading.Event, timeout: float = 60.0):
    """Run `loop` in `n` threads for the body of the `with`; on exit set `stop`, wait for
    every thread and fail the test when one raised (chained to the first exception, the
    others listed) or is still running. A failure of the body stays in the traceback as
    the context of a thread's failure."""
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="client")
    futures = [pool.submit(loop) for _ in range(n)]
    try:
        yield _Clients(futures)
    finally:
        stop.set()
        _, pending = wait(futures, timeout=timeout)
        pool.shutdown(wait=False, cancel_futures=True)
        errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
        if errors:
            raise AssertionError(
                f"{len(errors)} of {n} client threads raised: {errors[:3]!r}"
            ) from errors[0]
        assert not pending, f"{len(pending)} client threads still running after {timeout} s"


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

    with client_threads(3, loop, stop) as clients:
        time.sleep(2)
        local.deploy(serve_cfg(demo, model_version=version), served[0].keys)
        deadline = time.time() + 60
        while time.time() < deadline and clients.alive():
            model = requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
            if model["version"] == version and answers[-1][1].endswith(f"/{version}"):
                break
            time.sleep(0.5)
        time.sleep(2)
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

    with client_threads(8, loop, stop) as clients:
        deadline = time.time() + 90
        while time.time() < deadline and replicas(app, "Embedder") < 2 and clients.alive():
            time.sleep(0.5)
        assert replicas(app, "Embedder") == 2, "embedder did not scale up under load"
    deadline = time.time() + 90
    while time.time() < deadline and replicas(app, "Embedder") != 1:
        time.sleep(0.5)
    assert replicas(app, "Embedder") == 1, "embedder did not scale back down"


def neighbour_ids(answer: dict) -> tuple[str, ...]:
    return tuple(n["id"] for n in answer["neighbors"])


def register_other_weights(demo) -> int:
    """A new version of the demo model built from random weights (so its answers differ),
    in the same MLflow store; returns its version number."""
    import shutil
    from pathlib import Path

    from registry_parts import write_embeddings, write_head, write_index, write_metrics

    from medray import registry, storage

    cfg, _ = demo
    other = Path(cfg.workdir).with_name("tiny-serving-random")
    if not other.exists():
        shutil.copytree(cfg.workdir, other, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
        frame = storage.read_table(str(other / "data" / "manifest.parquet")).to_pandas()
        spec, emb = write_embeddings(other, frame, "random", seed=0)
        write_index(other, frame, spec, emb)
        write_head(other, spec, emb, frame)
        write_metrics(other, spec, emb, frame)
    store = {"tracking_uri": f"sqlite:///{Path(cfg.workdir) / 'mlflow.db'}"}
    reg = registry.RegistryConfig(workdir=str(other), mlflow=store)
    return registry.register(str(other), MODEL, reg)


def test_serving_follows_promote_and_rollback_one_version_per_answer(served, query, demo):
    """Serve the production alias pinned to its version, with the follower `medray serve`
    runs (1 s interval); promote a version built from other weights while clients loop,
    then roll back: the app follows both moves within the bound, no request fails, and
    every answer's neighbours are exactly those of the one version it names."""
    from medray import registry
    from medray.serving import follow

    cfg = serve_cfg(demo, follow_interval_s=1.0)
    reg = registry.RegistryConfig(workdir=cfg.workdir, mlflow=cfg.mlflow)
    start = follow.alias_version(cfg)
    local.deploy(follow.pin(cfg, start), served[0].keys)
    follower = local.follower(cfg, local.Served(served[0].url, served[0].keys, cfg.app_name,
                                                follow.pin(cfg, start)), say=lambda s: None)  # fmt: skip
    assert follower is not None and follower.version == start
    other = register_other_weights(demo)
    tick_errors: list[BaseException] = []
    ticking = threading.Event()

    def tick_loop() -> None:
        while not ticking.is_set():
            try:
                follower.tick()
            except BaseException as exc:  # noqa: BLE001
                tick_errors.append(exc)
            time.sleep(cfg.follow_interval_s)

    ticker = threading.Thread(target=tick_loop, daemon=True)
    ticker.start()
    bound = cfg.follow_interval_s + 30.0  # the interval plus loading a bundle on a busy box
    url = served[0].url
    try:
        with Clients(url, query, n=3) as clients:
            time.sleep(2)
            moved = time.time()
            registry.promote(MODEL, other, reg, force=True)
            deadline = moved + bound
            while time.time() < deadline and clients.first_from(f"{MODEL}/{other}", moved) is None:
                time.sleep(0.2)
            to_other = clients.first_from(f"{MODEL}/{other}", moved)
            time.sleep(2)
            back = time.time()
            registry.rollback(MODEL, reg)
            while (
                time.time() < back + bound and clients.first_from(f"{MODEL}/{start}", back) is None
            ):
                time.sleep(0.2)
            to_start = clients.first_from(f"{MODEL}/{start}", back)
            time.sleep(1)
    finally:
        ticking.set()
        ticker.join(timeout=60)
    assert not tick_errors, tick_errors
    assert to_other is not None and to_other - moved <= bound, "promotion not followed"
    assert to_start is not None and to_start - back <= bound, "rollback not followed"
    print(f"followed promote in {to_other - moved:.1f} s, rollback in {to_start - back:.1f} s")
    assert not clients.failed(), clients.failed()[:3]
    by_model: dict[str, set] = {}
    for _, _, body, _ in clients.answers:
        by_model.setdefault(body["model"], set()).add(neighbour_ids(body))
    assert set(by_model) == {f"{MODEL}/{start}", f"{MODEL}/{other}"}, set(by_model)
    assert all(len(v) == 1 for v in by_model.values()), by_model  # never a mixed answer
    assert by_model[f"{MODEL}/{start}"] != by_model[f"{MODEL}/{other}"]
    model = requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()
    assert model["version"] == start and not model["swapping"], model
    assert set(model["deployments"].values()) == {f"{MODEL}/{start}"}


def replica_processes(app: str, deployment: str) -> list:
    """This test session's live replica processes of one deployment (descendants of the
    pytest process, which started the local Ray)."""
    import psutil

    tag = f"ServeReplica:{app}:{deployment}"
    out = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(tag in part for part in proc.cmdline()) and proc.status() != "zombie":
                out.append(proc)
    return out


@pytest.mark.parametrize("deployment", ["Embedder", "Retriever", "Ingress"])
def test_kill_9_replica_under_load(served, query, demo, deployment):
    """kill -9 one replica process while 4 clients loop: under 1 % of requests fail, each
    failure is a 503 JSON with Retry-After, and answers flow again within 30 s."""
    import signal

    url, app = served[0].url, served[0].app_name
    victims = replica_processes(app, deployment)
    assert victims, f"no {deployment} replica process found"
    with Clients(url, query, n=4) as clients:
        time.sleep(3)
        killed = time.time()
        os.kill(victims[0].pid, signal.SIGKILL)
        deadline = killed + 30
        while time.time() < deadline:
            recent = [a for a in clients.answers if a[0] > time.time() - 2]
            fresh = [p for p in replica_processes(app, deployment) if p.pid != victims[0].pid]
            if fresh and len(recent) >= 4 and all(a[1] == 200 for a in recent):
                break
            time.sleep(0.3)
        recovered = time.time() - killed
        time.sleep(2)
    answers, failed = clients.answers, clients.failed()
    gaps = [b[0] - a[0] for a, b in zip(answers, answers[1:], strict=False) if b[0] > killed - 1]
    print(f"kill -9 {deployment}: {len(failed)}/{len(answers)} failed, statuses "
          f"{Counter(a[1] for a in failed)}, recovered in {recovered:.1f} s, "
          f"longest gap {max(gaps, default=0):.1f} s")  # fmt: skip
    assert recovered < 30, f"{deployment}: answers did not flow again within 30 s"
    assert len(failed) <= max(1, len(answers) // 100), failed[:3]
    for _, status, body, headers in failed:
        assert status == 503 and isinstance(body, dict) and body["error"] == "unavailable", body
        assert int(headers["Retry-After"]) >= 1
    versions = set(
        requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()["deployments"].values()
    )
    assert len(versions) == 1, versions


def test_dicom_upload_is_searched_and_a_non_image_dicom_is_422(served):
    """A clinician's viewer exports DICOM: the real app decodes it (windowed, 8 bit) and
    answers neighbours; a structured report (no pixels) is a 422 naming why."""
    from pydicom.data import get_testdata_file

    url = served[0].url
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    resp = requests.post(f"{url}/v1/search", files={"image": ("ct.dcm", ct)}, headers=AUTH,
                         data={"k": "3"}, timeout=60)  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["neighbors"]) == 3
    sr = open(get_testdata_file("test-SR.dcm"), "rb").read()
    resp = requests.post(f"{url}/v1/search", files={"image": ("sr.dcm", sr)}, headers=AUTH,
                         timeout=60)  # fmt: skip
    assert resp.status_code == 422, resp.text
    assert "not an image" in resp.json()["reason"] and resp.json()["field"] == "image"


def test_grafana_dashboard_uses_only_metrics_medray_exports():
    """Every query of serve/grafana-medray.json names a series medray.serving.metrics defines."""
    import json
    import re
    from pathlib import Path

    from medray.serving import metrics

    source = Path(metrics.__file__).read_text()
    defined = set(re.findall(r'"(medray_[a-z_]+)"', source))
    dash = json.loads(
        (Path(__file__).resolve().parents[1] / "serve" / "grafana-medray.json").read_text()
    )
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"ray_(medray_[a-z_]+)", e)
    }
    assert used and used <= defined, used - defined
    assert defined <= used, f"metrics without a panel: {defined - used}"
