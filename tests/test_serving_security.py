"""Serving without Ray: API keys, request limits, input parsing and the HTTP surface over
an in-process backend (FastAPI TestClient), plus config checks. Milliseconds each."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medray.config import ConfigError
from medray.serving import security
from medray.serving.api import create_api
from medray.serving.backend import LocalBackend
from medray.serving.config import EmbedderConfig, Limits, ServeConfig
from medray.serving.local import fit_resources

LABELS = ["red", "green", "blue"]


class ColourBundle:
    """A tiny real bundle for the HTTP layer's tests: mean colour -> embedding, gallery of
    pure-colour images. Same interface as medray.registry.ServiceBundle."""

    def __init__(self, version: int = 1) -> None:
        rng = np.random.default_rng(version)
        self.ids = [f"img{i:03d}" for i in range(30)]
        self.labels = [LABELS[i % 3] for i in range(30)]
        base = np.eye(3)[[i % 3 for i in range(30)]] + rng.random((30, 3)) * 0.3
        self.gallery = self.normalise(np.hstack([base, np.ones((30, 1)) * 0.1]))
        self.info = {"name": "colour", "version": version, "alias": "production", "dim": 4}
        self.pair_threshold = 0.9

    @staticmethod
    def normalise(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        means = np.stack([im.reshape(-1, 3).mean(0) / 255.0 for im in images])
        return self.normalise(np.hstack([means, np.full((len(images), 1), 0.1)]))

    def search(self, emb: np.ndarray, k: int) -> list[list[dict]]:
        scores = emb @ self.gallery.T
        out = []
        for row in scores:
            top = np.argsort(-row)[:k]
            out.append(
                [{"id": self.ids[i], "score": float(row[i]), "labels": [self.labels[i]], "uri": "x"}
                 for i in top]
            )  # fmt: skip
        return out

    def classify(self, emb: np.ndarray) -> list[dict]:
        probs = np.exp(emb[:, :3] * 5)
        probs /= probs.sum(1, keepdims=True)
        return [
            {"tissue": {"kind": "multiclass",
                        "probabilities": dict(zip(LABELS, p.astype(np.float32))),
                        "decisions": [LABELS[int(np.argmax(p))]],
                        "thresholds": {lb: 0.5 for lb in LABELS}}}
            for p in probs
        ]  # fmt: skip

    def compare(self, a: np.ndarray, b: np.ndarray) -> dict:
        sim = float(np.dot(a, b))
        return {"similarity": sim, "same_category": sim >= self.pair_threshold,
                "threshold": self.pair_threshold}  # fmt: skip

    def has_image(self, image_id: str) -> bool:
        return image_id in self.ids

    def thumbnail(self, image_id: str, size: int = 128) -> bytes:
        return png(np.full((size, size, 3), 128, np.uint8))


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


RED = png(np.tile(np.array([220, 20, 20], np.uint8), (40, 40, 1)))
AUTH = {"Authorization": "Bearer k1"}
LIMITS = Limits(max_upload_bytes=200_000, max_pixels=1_000_000, max_k=20)


@pytest.fixture(scope="module")
def client():
    app = create_api(LocalBackend(ColourBundle()), (security.digest("k1"),), LIMITS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# ---- keys -------------------------------------------------------------------------------


def test_keys_from_env_and_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDRAY_API_KEYS", " a , b,,")
    keys = security.resolve_keys("MEDRAY_API_KEYS", None)
    assert keys.digests == (security.digest("a"), security.digest("b"))
    assert "MEDRAY_API_KEYS" in keys.source and "a" not in keys.source.split("(")[0][-3:]
    monkeypatch.delenv("MEDRAY_API_KEYS")
    f = tmp_path / "keys.txt"
    f.write_text("# ops keys\nkf1\n\nkf2\n")
    keys = security.resolve_keys("MEDRAY_API_KEYS", str(f))
    assert len(keys.digests) == 2 and str(f) in keys.source and keys.local_key == "kf1"


def test_no_keys_refused_or_generated(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDRAY_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="MEDRAY_API_KEYS"):
        security.resolve_keys("MEDRAY_API_KEYS", None)
    with pytest.raises(ConfigError, match="not found"):
        security.resolve_keys("MEDRAY_API_KEYS", str(tmp_path / "none"))
    keys = security.resolve_keys("MEDRAY_API_KEYS", None, generate=True)
    assert keys.generated and security.key_allowed(keys.local_key, keys.digests)


def test_bearer_parsing_and_check():
    digests = (security.digest("k1"),)
    assert security.bearer_token("Bearer k1") == "k1"
    assert security.bearer_token("bearer  k1 ") == "k1"
    assert security.bearer_token("Basic k1") is None and security.bearer_token(None) is None
    assert security.key_allowed("k1", digests) and not security.key_allowed("k2", digests)
    assert not security.key_allowed(None, digests) and not security.key_allowed("", digests)


@pytest.mark.parametrize("bad", ["../etc", "..", "a/b", "a\\b", "", ".hidden", "x" * 300, "a\x00"])
def test_image_ids_reject_paths(bad):
    assert not security.valid_image_id(bad)


def test_image_ids_accept_plain_tokens():
    assert security.valid_image_id("3f2a9c0d1e2b4a5c") and security.valid_image_id("img_01.tif")


# ---- config -----------------------------------------------------------------------------


def test_batch_size_needs_enough_ongoing_requests():
    with pytest.raises(ValueError, match="max_batch_size"):
        EmbedderConfig(max_batch_size=16, max_ongoing_requests=8)


def test_model_uri_forms():
    assert ServeConfig().model_uri() == "models:/medray-demo@production"
    assert ServeConfig(model_alias="candidate").model_uri() == "models:/medray-demo@candidate"
    assert ServeConfig(model_version=3).model_uri() == "models:/medray-demo/3"
    assert ServeConfig(bundle_path="/b").model_uri() == "/b"


def test_fit_resources_keeps_everything_placeable():
    cfg = ServeConfig()
    fitted = fit_resources(cfg, 2.0)
    deps = [fitted.ingress, fitted.embedder, fitted.retriever, fitted.classifier]
    assert sum(d.num_cpus * d.autoscaling.max_replicas for d in deps) <= 1.5 + 1e-6
    assert cfg.embedder.num_cpus == 1.0  # the original is untouched
    assert fit_resources(cfg, 64.0).embedder.num_cpus == 1.0


# ---- HTTP surface -----------------------------------------------------------------------


def test_health_and_page_need_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    head = client.head("/healthz")
    assert head.status_code == 200 and head.content == b""
    assert "medray" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200
    doc = client.get("/openapi.json").json()
    assert "/v1/search" in doc["paths"]
    # the bearer scheme is declared (/docs shows Authorize) and required on every /v1 route
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer",
        "description": "An API key from `medray serve`'s start-up lines: Authorization: Bearer <key>",
    }  # fmt: skip
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert (op.get("security") == [{"apiKey": []}]) == path.startswith("/v1"), path


@pytest.mark.parametrize(
    "method,path",
    [("post", "/v1/search"), ("post", "/v1/classify"), ("post", "/v1/compare"),
     ("get", "/v1/model"), ("get", "/v1/images/img000/thumbnail")],
)  # fmt: skip
def test_every_api_route_needs_a_key(client, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
        resp = getattr(client, method)(path, headers=headers)
        assert resp.status_code == 401, (path, headers)
        assert resp.json()["error"] == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_search_multipart_and_json(client):
    resp = client.post("/v1/search", headers=AUTH, files={"image": ("q.png", RED)}, data={"k": 5})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert len(out["neighbors"]) == 5 and out["model"] == "colour/1"
    assert all(n["labels"] == ["red"] for n in out["neighbors"])
    assert out["neighbors"][0]["thumbnail_url"].startswith("/v1/images/img")
    body = {"image": base64.b64encode(RED).decode(), "k": 3}
    out = client.post("/v1/search?k=7", headers=AUTH, json=body).json()
    assert len(out["neighbors"]) == 3  # the body's k wins over the query's
    out = client.post("/v1/search?k=2", headers=AUTH, files={"image": ("q", RED)}).json()
    assert len(out["neighbors"]) == 2


def test_classify_compare_thumbnail_model(client):
    out = client.post("/v1/classify", headers=AUTH, files={"image": ("q.png", RED)}).json()
    assert out["tasks"]["tissue"]["decisions"] == ["red"]
    assert len(out["neighbors"]) == LIMITS.default_k
    blue = png(np.tile(np.array([10, 10, 230], np.uint8), (30, 30, 1)), "TIFF")
    same = client.post("/v1/compare", headers=AUTH, files={"image_a": RED, "image_b": RED})
    diff = client.post("/v1/compare", headers=AUTH, files={"image_a": RED, "image_b": blue})
    assert same.json()["same_category"] is True and diff.json()["same_category"] is False
    assert same.json()["similarity"] > diff.json()["similarity"]
    thumb = client.get("/v1/images/img001/thumbnail?size=64", headers=AUTH)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert client.get("/v1/model", headers=AUTH).json()["version"] == 1


@pytest.mark.parametrize(
    "kwargs,status,field",
    [
        ({"files": {"image": ("q", b"hello world, not an image")}}, 415, "image"),
        ({"files": {"image": ("q", RED[: len(RED) // 2])}}, 422, "image"),
        ({"files": {"other": ("q", RED)}}, 422, "image"),
        ({"data": {"image": "text"}}, 415, None),
        ({"files": {"k": ("k", b"3")}, "data": {"image": "text"}}, 422, "image"),
        ({"files": {"image": ("q", RED)}, "data": {"k": "0"}}, 422, "k"),
        ({"files": {"image": ("q", RED)}, "data": {"k": "1000"}}, 422, "k"),
        ({"files": {"image": ("q", RED)}, "data": {"k": "ten"}}, 422, "k"),
        ({"json": {"image": "!!notbase64!!"}}, 422, "image"),
        ({"json": {"image": 5}}, 422, "image"),
        ({"json": [1, 2]}, 422, None),
        ({"content": b"raw", "headers": {"content-type": "text/plain"}}, 415, None),
        ({"files": {"image": ("big", png(np.zeros((1100, 1000, 3), np.uint8)))}}, 413, "image"),
        ({"files": {"image": ("huge", b"\0" * 300_000)}}, 413, "image"),
        ({"content": b"x" * 400_000, "headers": {"content-type": "application/json"}}, 413, None),
    ],
)
def test_bad_requests_get_4xx_json_naming_the_field(client, kwargs, status, field):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    resp = client.post("/v1/search", headers=headers, **kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["reason"] and body.get("field") == field


def test_thumbnail_ids_validated(client):
    assert client.get("/v1/images/nope/thumbnail", headers=AUTH).status_code == 404
    assert client.get("/v1/images/..%2F..%2Fetc/thumbnail", headers=AUTH).status_code == 404
    assert client.get("/v1/images/.secret/thumbnail", headers=AUTH).status_code == 422
    assert client.get("/v1/images/img001/thumbnail?size=9999", headers=AUTH).status_code == 422


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        st.binary(max_size=2048),
        st.builds(lambda n: RED[:n], st.integers(0, len(RED))),
        st.builds(lambda b: b"\x89PNG\r\n\x1a\n" + b, st.binary(max_size=256)),
    ),
    field=st.sampled_from(["image", "img", "image_a", "k"]),
    k=st.one_of(st.none(), st.integers(-5, 500).map(str), st.text(max_size=5)),
)
def test_fuzz_in_process_never_5xx(client, payload, field, k):
    data = {} if k is None else {"k": k}
    resp = client.post("/v1/search", headers=AUTH, files={field: ("f", payload)}, data=data)
    assert resp.status_code < 500, resp.text
    assert "reason" in resp.json() or "neighbors" in resp.json()


# ---- deploy config ----------------------------------------------------------------------


def test_serve_deploy_config_builds(monkeypatch):
    """serve/config.yaml is a valid Serve deploy config whose builder makes the app, and its
    user_configs name the same model the args do."""
    from pathlib import Path

    import yaml
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from medray.serving.app import build_app

    path = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
    spec = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app_spec,) = spec.applications
    assert app_spec.import_path == "medray.serving.app:build_app"
    monkeypatch.setenv("MEDRAY_API_KEYS", "k1")
    args = {**app_spec.args, "api_keys_file": None}
    # The alias is resolved when the app is built (a registry read, faked here: no server).
    monkeypatch.setattr("medray.serving.follow.alias_version", lambda cfg, uri=None: 3)
    monkeypatch.setattr("medray.serving.app.bundle_shards", lambda cfg: 1)  # its index shards
    app = build_app(args)
    assert isinstance(app, Application)
    models = [a for a in app._bound_deployment.init_args if isinstance(a, Application)]
    uris = {m._bound_deployment._deployment_config.user_config["model_uri"] for m in models}
    assert uris == {"models:/medray/3"}  # pinned: restarted replicas load this version
    raw = yaml.safe_load(path.read_text())["applications"][0]["deployments"]
    assert not any("user_config" in d for d in raw)  # the YAML would override the pin
    monkeypatch.delenv("MEDRAY_API_KEYS")
    with pytest.raises(ConfigError, match="no API keys"):
        build_app(args)


def test_deeply_nested_json_is_a_422_not_a_500(client):
    body = b"[" * 50_000 + b"]" * 50_000  # 100 kB: under the upload cap, past json's depth
    for payload in (body, b'{"image": ' + body + b"}"):
        resp = client.post("/v1/search", headers={**AUTH, "content-type": "application/json"},
                           content=payload)  # fmt: skip
        assert resp.status_code == 422, resp.text
        assert resp.json() == {"error": "invalid", "reason": "JSON body is nested too deeply"}


# ---- hardening: decode budget, JSON shape, headers, offline docs, no paths, loopback -----

DEFAULTS = Limits()  # what `medray serve` runs with: 25 Mpx, 200 MB decode budget


class PathyBundle(ColourBundle):
    """A bundle whose info carries locations, as a real one's lineage and weights do."""

    def __init__(self) -> None:
        super().__init__()
        self.info = {
            **self.info,
            "metrics": {"retrieval": {"avg@10": 0.5}, "plots": ["pca.png"]},
            "lineage": {
                "workdir": "/srv/medray/work",
                "backbone_weights": "/srv/medray/work/pretrain/byol/export",
                "manifest_sha256": "ab" * 32,
                "runs": {"embed": "0123abcd", "select": None},
                "sources": ["s3://archive/x-rays", "C:\\\\data\\\\tiles", "bundled"],
            },
            "tracking_uri": "sqlite:////srv/medray/work/mlflow.db",
        }


@pytest.fixture(scope="module")
def served_defaults():
    backend = LocalBackend(PathyBundle(), model_uri="/srv/medray/bundles/v1")
    app = create_api(backend, (security.digest("k1"),), DEFAULTS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def bombs() -> dict[str, bytes]:
    from serving_helpers import png_header
    from test_decode import tiff_bomb

    return {
        "float64 RGB 4990x4990": tiff_bomb(4990, 4990, 3, "rgb"),
        "float64 16-channel 1300x1300": tiff_bomb(1300, 1300, 16, "minisblack"),
        "PNG header 20000x20000": png_header(20000, 20000),
    }


def assert_too_large(resp, limit_text: str) -> None:
    assert resp.status_code == 413, resp.text
    body = resp.json()
    assert body["error"] == "too_large" and body["field"] == "image"
    assert body["reason"].startswith("image: too large") and limit_text in body["reason"]


def test_bombs_answer_413_without_growing_rss(served_defaults):
    from test_decode import peak_rss_growth_mb

    limits = {"P": "max_pixels 25,000,000", "f": "max_decode_bytes 200,000,000"}
    for name, data in bombs().items():
        assert len(data) < DEFAULTS.max_upload_bytes
        files = {"image": ("bomb", data)}
        grew, resp = peak_rss_growth_mb(
            lambda f=files: served_defaults.post("/v1/search", headers=AUTH, files=f)
        )
        assert_too_large(resp, limits[name[0]])
        assert grew < 64, f"{name}: RSS grew {grew:.0f} MB (budget {DEFAULTS.max_decode_bytes})"


def test_deep_or_wide_json_and_odd_multipart_are_4xx(served_defaults):
    deep = b"[" * 100_000 + b"]" * 100_000  # 200 kB, 100,000 levels
    objects = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    wide = b"{" + b",".join(b'"k%d":0' % i for i in range(100_000)) + b"}"
    for body in (deep, objects, b'{"image": ' + deep + b"}", b'{"k": ' + deep + b"}", wide):
        resp = served_defaults.post(
            "/v1/search", headers={**AUTH, "content-type": "application/json"}, content=body
        )
        assert resp.status_code == 422, resp.text
        assert "nested too deeply" in resp.json()["reason"] or "too many" in resp.json()["reason"]
    forms = [
        {"files": {"image": ("q", RED)}, "data": {"k": deep.decode()}},  # k: not an int
        {"files": {"image": ("q", deep)}},  # deep JSON as the image: not an image
        {"files": {"image": ("q", RED)}, "data": {f"f{i}": "x" for i in range(100)}},
        {"files": {f"image{i}": ("q", RED) for i in range(10)}},
    ]
    for kwargs in forms:
        resp = served_defaults.post("/v1/search", headers=AUTH, **kwargs)
        assert 400 <= resp.status_code < 500 and resp.json()["reason"], resp.text


def test_decoding_is_bounded_per_replica(monkeypatch):
    """No more than max_concurrent_decodes images decode at once, whatever the requests."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from medray.serving import inputs

    running, peak, lock = [0], [0], threading.Lock()

    def slow_decode(data, name, max_pixels, max_bytes):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.15)
        with lock:
            running[0] -= 1
        return np.zeros((8, 8, 3), np.uint8)

    monkeypatch.setattr(inputs, "decode_image", slow_decode)
    app = create_api(
        LocalBackend(ColourBundle()), (security.digest("k1"),), Limits(max_concurrent_decodes=2)
    )
    with TestClient(app) as c, ThreadPoolExecutor(6) as pool:  # one event loop, 6 requests
        post = lambda _: c.post("/v1/search", headers=AUTH, files={"image": ("q", RED)})  # noqa: E731
        assert [r.status_code for r in pool.map(post, range(6))] == [200] * 6
    assert peak[0] == 2


HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def test_security_headers_on_every_answer(served_defaults):
    class Broken(ColourBundle):
        def embed(self, images):
            raise RuntimeError("boom")

    broken = create_api(LocalBackend(Broken()), (security.digest("k1"),), DEFAULTS)
    with TestClient(broken, raise_server_exceptions=False) as bc:
        crash = bc.post("/v1/search", headers=AUTH, files={"image": ("q", RED)})
    assert crash.status_code == 500 and crash.json() == {
        "error": "internal",
        "reason": "RuntimeError",
    }
    c = served_defaults
    answers = {
        "page": c.get("/"),
        "script": c.get("/static/app.js"),
        "docs": c.get("/docs"),
        "redoc": c.get("/redoc"),
        "openapi": c.get("/openapi.json"),
        "health": c.get("/healthz"),
        "head health": c.head("/healthz"),
        "401": c.post("/v1/search"),
        "413": c.post("/v1/search", headers=AUTH, files={"image": ("q", bombs()["PNG header 20000x20000"])}),
        "422": c.post("/v1/search", headers=AUTH, json={"image": 5}),
        "404": c.get("/nothing-here"),
        "500": crash,
    }  # fmt: skip
    assert answers["head health"].status_code == 200 and answers["head health"].content == b""
    for what, resp in answers.items():
        for name, value in HEADERS.items():
            assert resp.headers.get(name) == value, (what, name, dict(resp.headers))
        csp = resp.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, (what, csp)
        script_src = next(d for d in csp.split("; ") if d.startswith("script-src"))
        assert "unsafe-inline" not in script_src and "http" not in csp, (what, csp)
    for what in ("health", "401", "413", "422", "404", "500", "openapi"):
        assert answers[what].headers["cache-control"] == "no-store", what
    assert answers["page"].headers["content-security-policy"] == (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    thumb = c.get("/v1/images/img001/thumbnail", headers=AUTH)
    assert thumb.headers["cache-control"] == "private, max-age=3600"  # behind a key: no proxy


def test_docs_are_served_offline_from_the_package(served_defaults):
    import base64
    import hashlib
    import re

    for page, assets in (
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"]),
        ("/redoc", ["redoc.standalone.js", "favicon.png"]),
    ):
        resp = served_defaults.get(page)
        assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
        html = resp.text
        assert not re.search(r"https?://", html), f"{page} references another origin"
        for name in assets:
            assert f'"/docs-assets/{name}"' in html, (page, name)
            asset = served_defaults.get(f"/docs-assets/{name}")
            assert asset.status_code == 200 and len(asset.content) > 1000, name
        csp = resp.headers["content-security-policy"]
        for script in re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL):
            digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp  # the inline start-up script, by hash only
    assert "validatorUrl" in served_defaults.get("/docs").text  # no public validator badge
    assert served_defaults.get("/docs/oauth2-redirect").status_code == 404


def test_model_answer_holds_no_path(served_defaults):
    from medray.serving.redact import PATH_KEYS, is_location

    out = served_defaults.get("/v1/model", headers=AUTH).json()

    def walk(value, where="") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert k not in PATH_KEYS, f"{where}.{k}"
                walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str):
            assert not is_location(value) and "/srv/" not in value, f"{where}: {value}"

    walk(out)
    assert out["version"] == 1 and out["name"] == "colour"  # the rest is kept
    assert out["info"]["lineage"]["runs"]["embed"] == "0123abcd"
    assert out["info"]["lineage"]["sources"] == ["bundled"]
    assert out["info"]["metrics"]["plots"] == ["pca.png"]


def test_strip_paths_drops_locations_only():
    from medray.serving.redact import strip_paths

    value = {
        "model_uri": "models:/medray-demo@production",
        "bundle": "/data/bundles/v3",
        "workdir": "relative/dir",
        "runs": {"embed": "a1b2", "store": "postgresql://db/mlflow"},
        "list": ["~/x", "./y", "../z", "\\\\share\\x", "D:/x", "file:///x", "gs://b/x", "ok"],
        "n": 3,
        "alias": None,
    }
    assert strip_paths(value) == {
        "model_uri": "models:/medray-demo@production",
        "runs": {"embed": "a1b2"},
        "list": ["ok"],
        "n": 3,
        "alias": None,
    }


def test_local_ray_is_started_on_loopback(monkeypatch):
    """medray.raycluster.init starts a local Ray whose node address, and so every server
    Ray binds (GCS, raylet, object manager, workers, agents, metrics), is 127.0.0.1."""
    import os

    import ray
    from ray._private import ray_constants

    from medray import raycluster
    from medray.config import RayConfig

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    env = dict(os.environ)
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs, cluster_mode=ray_constants.ENABLE_RAY_CLUSTER)
        seen["env"] = os.environ.get(raycluster.LOOPBACK_ENV)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv(raycluster.LOOPBACK_ENV, raising=False)
    try:
        raycluster.init(RayConfig(num_cpus=1))
        assert seen["_node_ip_address"] == "127.0.0.1" and seen["address"] is None
        assert seen["cluster_mode"] is False and seen["env"] == "0"
        assert seen["include_dashboard"] is False
        seen.clear()
        raycluster.init(RayConfig(address="ray://head:10001"))  # joining a cluster: untouched
        assert "_node_ip_address" not in seen and seen["address"] == "ray://head:10001"
    finally:
        os.environ.clear()
        os.environ.update(env)


def replica_pid(title: str) -> int:
    """PID of the Ray worker process titled `title` that this test process started (its
    ancestors include us: other Ray sessions on the machine may run the same app)."""
    import os
    from pathlib import Path

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(title.encode()):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != os.getpid():
                pid = parent(pid)
        except OSError:  # gone meanwhile
            continue
        if pid == os.getpid():
            return int(entry.name)
    raise LookupError(f"no process titled {title!r} under this test")


@pytest.mark.integration
def test_served_ingress_refuses_bombs_within_its_budget(ray_local):
    """The real Ingress deployment in a Ray Serve replica, behind Serve's HTTP proxy: each
    bomb is a 413 and the replica's peak RSS stays far under max_decode_bytes; security
    headers, HEAD /healthz and the offline docs hold over real HTTP too."""
    import re

    import requests
    from ray import serve
    from test_decode import peak_rss_growth_mb

    from medray.serving.app import Ingress
    from medray.serving.local import free_port, wait_healthy

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class NoModel:  # a bomb never reaches a model
        def info(self) -> dict:
            return {"name": "none", "key": "none/0"}

    try:  # the proxy's port is fixed when Serve starts: start it afresh if it runs
        ray_local.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        serve.shutdown()
    except ValueError:
        pass
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    stub = NoModel.bind()
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0}).bind(
        stub, stub, stub, [security.digest("k1")], DEFAULTS.model_dump()
    )
    serve.run(ingress, name="medray-sec", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=180)
        pid = replica_pid("ray::ServeReplica:medray-sec:Ingress")
        limits = {"P": "max_pixels 25,000,000", "f": "max_decode_bytes 200,000,000"}
        for name, data in bombs().items():
            grew, resp = peak_rss_growth_mb(
                lambda d=data: requests.post(
                    f"{url}/v1/search", headers=AUTH, files={"image": ("b", d)}, timeout=60
                ),
                pid=pid,
            )
            assert_too_large(resp, limits[name[0]])
            print(f"Ingress replica peak RSS +{grew:.1f} MB on {name} ({len(data):,} B)")
            assert grew < 64, f"{name}: replica RSS grew {grew:.0f} MB"
        head = requests.head(f"{url}/healthz", timeout=10)
        docs = requests.get(f"{url}/docs", timeout=10)
        assert head.status_code == 200 and docs.status_code == 200
        assert not re.search(r"https?://", docs.text)
        for resp in (head, docs):
            assert all(resp.headers.get(k) == v for k, v in HEADERS.items()), resp.headers
            assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
    finally:
        serve.shutdown()
