"""Unit tests of the pieces that keep one model version per request (no Ray): pinning an
alias, the replica's bundle holder during a swap, the retry/503 mapping of the Ingress's
calls and the proxy middleware that answers a lost Ingress replica. The integration tests
(a real promote and rollback followed, kill -9 of each replica) are in test_serving.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from medray.serving import deployments, follow, proxy
from medray.serving.backend import HandleBackend
from medray.serving.config import ServeConfig
from medray.serving.inputs import ApiError


class Bundle:
    def __init__(self, name: str, version: int) -> None:
        self.info = {"name": name, "version": version}


def test_pin_resolves_alias_to_a_version_and_leaves_versions_and_paths():
    cfg = ServeConfig(model_name="m", model_alias="production")
    assert follow.follows_alias(cfg)
    pinned = follow.pin(cfg, 7)
    assert pinned.model_uri() == "models:/m/7" and not follow.follows_alias(pinned)
    assert cfg.model_uri() == "models:/m@production"  # the user's config is not changed
    assert not follow.follows_alias(ServeConfig(bundle_path="/b"))
    fixed = ServeConfig(model_name="m", model_version=3)
    assert follow.pinned(fixed).model_uri() == "models:/m/3"  # no registry read needed


def test_expected_key_only_for_pinned_versions():
    assert deployments.expected_key("models:/medray-demo/12") == "medray-demo/12"
    assert deployments.expected_key("models:/medray-demo@production") is None
    assert deployments.expected_key("/bundles/x") is None


def test_bundle_holder_swap_waits_for_the_loading_version_and_refuses_others(monkeypatch):
    """During a swap an embedding of the new version waits for it to load; one of the old
    version is served from the old bundle; one of a version never held is refused."""
    gate = {"2": asyncio.Event()}
    loaded = []

    def load(model_uri: str, tracking_uri, parts=None):
        version = int(model_uri.rsplit("/", 1)[1])
        if str(version) in gate:
            asyncio.run_coroutine_threadsafe(gate[str(version)].wait(), loop).result()
        loaded.append(version)
        return Bundle("m", version)

    monkeypatch.setattr(deployments, "load_service_bundle", load)

    async def scenario():
        holder = deployments.BundleHolder()
        await holder.reconfigure({"model_uri": "models:/m/1", "tracking_uri": None})
        swap = asyncio.ensure_future(
            holder.reconfigure({"model_uri": "models:/m/2", "tracking_uri": None})
        )
        await asyncio.sleep(0.05)
        assert holder.info()["swapping"] and holder.current()[0] == "m/1"
        old = await holder.get("m/1")
        waiting = asyncio.ensure_future(holder.get("m/2"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # waits for the version it was embedded with
        with pytest.raises(deployments.VersionUnavailable, match="m/9"):
            await holder.get("m/9")
        gate["2"].set()
        new = await waiting
        await swap
        assert old.info["version"] == 1 and new.info["version"] == 2
        assert holder.current()[0] == "m/2" and not holder.info()["swapping"]
        assert (await holder.get("m/1")).info["version"] == 1  # kept for in-flight requests

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert loaded == [1, 2]


class Method:
    """Stands for a DeploymentHandle method: `.remote(...)` raises the queued errors first."""

    def __init__(self, *errors: BaseException, result=None) -> None:
        self.errors, self.result, self.calls = list(errors), result, 0

    async def remote(self, *args):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_handle_calls_retry_a_lost_replica_once_then_answer_503():
    from ray.exceptions import ActorDiedError

    backend = HandleBackend(None, None, None)
    once = Method(ActorDiedError(), result="ok")
    assert run(backend.call(once)) == "ok" and once.calls == 2
    twice = Method(ActorDiedError(), ActorDiedError(), result="ok")
    with pytest.raises(ApiError) as err:
        run(backend.call(twice))
    assert err.value.status == 503 and err.value.retry_after >= 1
    other = Method(deployments.VersionUnavailable("made by m/1, serves m/2; retry"))
    with pytest.raises(ApiError) as err:
        run(backend.call(other))
    assert err.value.status == 503 and "m/1" in err.value.reason and other.calls == 1
    with pytest.raises(ValueError):
        run(backend.call(Method(ValueError("a bug"))))  # not a lost replica: not retried


def asgi_call(app, body: bytes = b'{"image": "x"}'):
    """Run an ASGI app on one POST; returns (status, headers, body) sent."""
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/search",
             "headers": [(b"content-length", str(len(body)).encode())]}  # fmt: skip
    run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_proxy_replays_a_request_whose_replica_died_with_the_same_body():
    seen: list[bytes] = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])
        if len(seen) == 1:
            return  # the replica died: the proxy sends nothing
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    status, _, body = asgi_call(proxy.ReplicaLostAs503(app))
    assert status == 200 and body == b"ok" and seen == [b'{"image": "x"}'] * 2


def test_proxy_answers_503_json_with_retry_after_when_the_replay_fails_too():
    async def app(scope, receive, send):
        await receive()

    status, headers, body = asgi_call(proxy.ReplicaLostAs503(app))
    assert status == 503 and int(headers[b"retry-after"]) >= 1
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert json.loads(body)["error"] == "unavailable"


def test_proxy_middleware_is_what_rays_callback_expects(monkeypatch):
    from starlette.middleware import Middleware

    monkeypatch.delenv(proxy.ENV, raising=False)
    proxy.enable()
    module, _, name = __import__("os").environ[proxy.ENV].partition(":")
    made = getattr(__import__(module, fromlist=[name]), name)()
    assert all(isinstance(m, Middleware) for m in made) and made[0].cls is proxy.ReplicaLostAs503
