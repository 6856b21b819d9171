"""Turn an HTTP request into decoded images and a `k`, or a 4xx `ApiError` naming the problem.

Two body shapes are accepted for every image endpoint: `multipart/form-data` with file
fields (`image`, or `image_a` and `image_b`) and an optional `k` field, or JSON with the
same fields holding base64 strings (a `data:...;base64,` prefix is allowed). `k` may also
come from the query string. The body is read with a hard byte cap before it is parsed, so
an oversized upload costs at most that many bytes of memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import weakref
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from medray.data.decode import DecodeError, decode_image
from medray.serving.config import Limits

FORM_OVERHEAD = 64 * 1024
"""Bytes allowed on top of the images for multipart boundaries, headers and small fields."""
MAX_JSON_CONTAINERS = 8
"""Objects and arrays a JSON body may open: it is one flat object of base64 strings and k."""
MAX_JSON_COMMAS = 32
"""Commas a JSON body may hold (base64 has none): bounds the values a parse may build, so
a body under the byte cap cannot expand to millions of Python objects."""


class ApiError(Exception):
    """A client error: HTTP status, a short code, a reason and the offending field."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.field = status, error, reason, field
        self.retry_after = retry_after
        """Seconds a client should wait before retrying (503s): sent as Retry-After."""

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "reason": self.reason}
        if self.field:
            out["field"] = self.field
        return out


@dataclass
class ImageRequest:
    images: dict[str, np.ndarray]
    k: int


def body_cap(n_images: int, limits: Limits) -> int:
    """Most bytes a request with `n_images` images may have (base64 inflates by 4/3)."""
    return n_images * (limits.max_upload_bytes * 4 // 3 + 4) + FORM_OVERHEAD


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `cap` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "too_large", f"request body is {declared} bytes; limit {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, "too_large", f"request body exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_k(raw: Any, limits: Limits) -> int:
    """`k` from a form, JSON or query value: an integer in 1..max_k."""
    if raw is None or raw == "":
        return limits.default_k
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ApiError(422, "invalid", f"k must be an integer, got {type(raw).__name__}", "k")
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(
            422, "invalid", f"k must be an integer, got {str(raw)[:40]!r}", "k"
        ) from None
    if not 1 <= k <= limits.max_k:
        raise ApiError(422, "invalid", f"k must be between 1 and {limits.max_k}, got {k}", "k")
    return k


def b64_image(value: Any, field: str, limits: Limits) -> bytes:
    """Bytes of a base64 JSON field, with the size checked before decoding."""
    if not isinstance(value, str):
        raise ApiError(422, "invalid", f"{field} must be a base64 string", field)
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    if len(value) * 3 // 4 > limits.max_upload_bytes + 3:
        raise ApiError(413, "too_large", f"{field} exceeds {limits.max_upload_bytes} bytes", field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid", f"{field} is not valid base64", field) from None


def check_json_shape(body: bytes) -> None:
    """422 for a JSON body nested or branching far beyond {"image": "<base64>", "k": 5},
    counted on the raw bytes (C speed, before any parse or recursion)."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_CONTAINERS:
        raise ApiError(422, "invalid", "JSON body is nested too deeply")
    if body.count(b",") > MAX_JSON_COMMAS:
        raise ApiError(
            422, "invalid", f"JSON body has too many values (more than {MAX_JSON_COMMAS} commas)"
        )


_DECODE_LIMITERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_slots(n: int) -> anyio.CapacityLimiter:
    """The limiter of this event loop that lets `n` images decode at once: a request past
    it waits (asynchronously, holding no thread) instead of adding another image's pixels."""
    by_size = _DECODE_LIMITERS.setdefault(asyncio.get_running_loop(), {})
    if n not in by_size:
        by_size[n] = anyio.CapacityLimiter(n)
    return by_size[n]


async def form_fields(request: Request, body: bytes) -> dict[str, Any]:
    """Parse a buffered multipart body (the original stream is already consumed)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as exc:  # python-multipart raises several types for malformed bodies
        raise ApiError(422, "invalid", f"malformed multipart body: {exc}"[:300]) from None
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        out.setdefault(key, await value.read() if isinstance(value, UploadFile) else value)
    await form.close()
    return out


async def raw_fields(request: Request, fields: tuple[str, ...], limits: Limits) -> dict[str, Any]:
    """Field name -> bytes (images) or raw value (`k`) from a multipart or JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send multipart/form-data or application/json, not {ctype or 'no content-type'!r}",
        )
    body = await read_body(request, body_cap(len(fields), limits))
    if ctype == "application/json":
        check_json_shape(body)
        try:
            data = json.loads(body or b"null")
        except RecursionError:  # a body nested thousands deep: the parser's own limit
            raise ApiError(422, "invalid", "JSON body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "invalid", "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid", "JSON body must be an object")
        return {k: b64_image(data[k], k, limits) if k in fields else v for k, v in data.items()}
    data = await form_fields(request, body)
    for name in fields:
        if isinstance(data.get(name), str):
            raise ApiError(422, "invalid", f"{name} must be a file upload, not a text field", name)
    return data


async def decode_field(data: Any, field: str, limits: Limits) -> np.ndarray:
    """Decoded RGB image of one field: 413 when too big, 415 unknown format, 422 corrupt."""
    if data is None:
        raise ApiError(422, "missing", f"field {field!r} (an image) is required", field)
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, "too_large", f"{field} exceeds {limits.max_upload_bytes} bytes", field)
    try:
        return await anyio.to_thread.run_sync(
            decode_image,
            data,
            field,
            limits.max_pixels,
            limits.max_decode_bytes,
            limiter=decode_slots(limits.max_concurrent_decodes),
        )
    except DecodeError as exc:
        if exc.reason.startswith("too large"):
            raise ApiError(413, "too_large", str(exc), field) from None
        if exc.reason.startswith("not a recognised image format"):
            raise ApiError(415, "unsupported_image", str(exc), field) from None
        raise ApiError(422, "undecodable_image", str(exc), field) from None


async def image_request(
    request: Request, fields: tuple[str, ...], limits: Limits, want_k: bool = True
) -> ImageRequest:
    """Images named `fields` and `k` (body field, else query parameter) from `request`."""
    data = await raw_fields(request, fields, limits)
    k = parse_k(data.get("k", request.query_params.get("k")), limits) if want_k else 0
    images = {name: await decode_field(data.get(name), name, limits) for name in fields}
    return ImageRequest(images=images, k=k)
