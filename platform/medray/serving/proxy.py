"""Serve's HTTP proxy answers a request whose replica died under it as a retryable 503 JSON.

When the Ingress replica holding a request is lost (killed, OOM, node gone), Ray Serve's
proxy has nothing to send and the client gets uvicorn's bare `500 Internal Server Error`.
Ray loads the middlewares that `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names into the
proxy; `enable()` sets it before a local Ray starts (raycluster.init) so the proxy's
processes inherit it; on a cluster, set it in the environment of `ray start`.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
RETRY_AFTER_S = 2
BODY = {
    "error": "unavailable",
    "reason": "the server lost the replica handling this request; retry",
}


def enable() -> None:
    """Have Serve proxies started from this process's Ray load `middlewares` (kept if set)."""
    os.environ.setdefault(ENV, "medray.serving.proxy:middlewares")


MAX_REPLAY_BYTES = 32 * 1024 * 1024
"""Largest request body the proxy keeps to send again (two 10 MB images in base64 fit)."""


class ReplicaLostAs503:
    """Pure ASGI middleware. medray's app answers every request it receives (errors too),
    so a request that ends with no response started lost its Ingress replica: it is sent
    once more (every medray endpoint only reads, so a replay is safe; Serve routes it to a
    live or restarted replica), and if that fails too the client gets a 503 JSON with
    Retry-After instead of a bare 500."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        body = await read_replayable(scope, receive)
        for _attempt in (1, 2):  # the first try, then one replay
            started = False

            async def tracking_send(message: dict) -> None:
                nonlocal started
                if message.get("type") == "http.response.start":
                    started = True
                await send(message)

            inner = receive if body is None else replay(body, receive)
            await self.app(scope, inner, tracking_send)
            if started or body is None:
                break
        if not started:
            await send_503(send, scope.get("path", "/v1"))


async def read_replayable(scope: dict, receive: Any) -> bytes | None:
    """The whole body when it is small enough to replay (declared length), else None."""
    declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
    if not declared.isdigit() or int(declared) > MAX_REPLAY_BYTES:
        return None
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Any) -> Any:
    """A receive() that gives `body` once, then waits on the client (for a disconnect)."""
    sent = False

    async def inner() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner


async def send_503(send: Any, path: str = "/v1") -> None:
    from medray.serving.headers import security_headers

    body = json.dumps(BODY).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ] + [(k.lower().encode(), v.encode()) for k, v in security_headers(path).items()]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """What Ray calls in each proxy (the callback import path): a list of Starlette
    Middleware."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostAs503)]
