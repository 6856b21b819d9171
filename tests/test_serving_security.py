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
    assert "/v1/search" in client.get("/openapi.json").json()["paths"]


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
    assert isinstance(build_app(args), Application)
    want = ServeConfig.model_validate(args).model_uri()
    raw = yaml.safe_load(path.read_text())["applications"][0]["deployments"]
    uris = {d["user_config"]["model_uri"] for d in raw if "user_config" in d}
    assert uris == {want}
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
