"""The HTTP API (FastAPI): versioned JSON endpoints, bearer-key auth, the web page.

`create_api(backend, key_digests, limits)` builds the app the Serve ingress wraps; it
holds no model itself, so the same app runs over DeploymentHandles in Serve or over a
bundle in-process (tests, benchmark baseline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from medray.serving import metrics, security
from medray.serving.backend import Backend
from medray.serving.config import Limits
from medray.serving.docs import install_docs
from medray.serving.headers import SecurityHeaders, security_headers
from medray.serving.inputs import ApiError, image_request
from medray.serving.redact import strip_paths

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("medray.serving")


class Neighbor(BaseModel):
    id: str
    score: float
    labels: list[str]
    thumbnail_url: str


class SearchResponse(BaseModel):
    neighbors: list[Neighbor]
    k: int
    model: str
    took_ms: float


class ClassifyResponse(BaseModel):
    tasks: dict[str, Any]
    """Per task: kind, probabilities {label: p}, decisions [labels], thresholds {label: t}."""
    neighbors: list[Neighbor]
    model: str
    took_ms: float
    query_preview: str | None = None
    """PNG data URL of the decoded query (only with ?preview=true; the page shows it)."""


def preview_png(image: Any, size: int = 224) -> str:
    """A small PNG data URL of a decoded image (browsers cannot show TIFF uploads)."""
    import base64
    import io

    from PIL import Image

    pil = Image.fromarray(image)
    pil.thumbnail((size, size))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class CompareResponse(BaseModel):
    similarity: float
    same_category: bool
    threshold: float
    model: str
    took_ms: float


def image_body_doc(fields: tuple[str, ...], with_k: bool = True) -> dict[str, Any]:
    """OpenAPI requestBody for endpoints that parse multipart or base64 JSON themselves."""
    files = {f: {"type": "string", "format": "binary"} for f in fields}
    b64 = {f: {"type": "string", "format": "byte"} for f in fields}
    k = {"k": {"type": "integer", "minimum": 1}} if with_k else {}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": list(fields), "properties": files | k}
                },
                "application/json": {
                    "schema": {"type": "object", "required": list(fields), "properties": b64 | k}
                },
            },
        }
    }


def neighbors(hits: list[dict[str, Any]]) -> list[Neighbor]:
    return [Neighbor(**h, thumbnail_url=f"/v1/images/{h['id']}/thumbnail") for h in hits]


def error_response(
    status: int, body: dict[str, Any], retry_after: int | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return JSONResponse(body, status_code=status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON with `error` and `reason` (and `field` when one is to blame)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.body(), exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = str(err["loc"][-1]) if err.get("loc") else None
        return error_response(422, ApiError(422, "invalid", err["msg"], field).body())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, {"error": "http", "reason": str(exc.detail)})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        resp = error_response(500, {"error": "internal", "reason": type(exc).__name__})
        resp.headers.update(security_headers(request.url.path))  # answered outside middleware
        return resp


BEARER = HTTPBearer(
    auto_error=False,  # our own 401 JSON error, not FastAPI's 403
    scheme_name="apiKey",
    description="An API key from `medray serve`'s start-up lines: Authorization: Bearer <key>",
)
"""Declares the bearer scheme in the OpenAPI document, so /docs has an Authorize button."""


def auth_dependency(key_digests: tuple[str, ...]):
    async def require_key(request: Request, _: object = Depends(BEARER)) -> None:
        token = security.bearer_token(request.headers.get("authorization"))
        if not security.key_allowed(token, key_digests):
            reason = "missing bearer token" if token is None else "unknown API key"
            raise ApiError(401, "unauthorized", f"{reason}: send Authorization: Bearer <key>")

    return require_key


def api_router(backend: Backend, limits: Limits, key_digests: tuple[str, ...]) -> APIRouter:
    """/v1/*: every route needs a key."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(auth_dependency(key_digests))])

    @router.post("/search", response_model=SearchResponse, openapi_extra=image_body_doc(("image",)))
    async def search(request: Request) -> SearchResponse:
        """Most similar gallery images to an uploaded image (`k` as a field or query)."""
        start = time.perf_counter()
        req = await image_request(request, ("image",), limits)
        key, emb = await backend.embed(req.images["image"])
        hits = await backend.search(key, emb, req.k)
        took = (time.perf_counter() - start) * 1e3
        return SearchResponse(neighbors=neighbors(hits), k=req.k, model=key, took_ms=took)

    @router.post(
        "/classify", response_model=ClassifyResponse, openapi_extra=image_body_doc(("image",))
    )
    async def classify(request: Request, preview: bool = False) -> ClassifyResponse:
        """Per-label probabilities and decisions, with the k nearest labelled images as evidence."""
        start = time.perf_counter()
        req = await image_request(request, ("image",), limits)
        key, emb = await backend.embed(req.images["image"])
        tasks, hits = await asyncio.gather(
            backend.classify(key, emb), backend.search(key, emb, req.k)
        )
        took = (time.perf_counter() - start) * 1e3
        shown = preview_png(req.images["image"]) if preview else None
        return ClassifyResponse(
            tasks=tasks, neighbors=neighbors(hits), model=key, took_ms=took, query_preview=shown
        )

    @router.post(
        "/compare",
        response_model=CompareResponse,
        openapi_extra=image_body_doc(("image_a", "image_b"), with_k=False),
    )
    async def compare(request: Request) -> CompareResponse:
        """Cosine similarity of two images and the same-category decision (tuned threshold)."""
        start = time.perf_counter()
        req = await image_request(request, ("image_a", "image_b"), limits, want_k=False)
        (key_a, a), (key_b, b) = await asyncio.gather(
            backend.embed(req.images["image_a"]), backend.embed(req.images["image_b"])
        )
        if key_a != key_b:  # a model swap landed between the two; embed both with one model
            key_b, b = await backend.embed(req.images["image_b"])
            key_a, a = await backend.embed(req.images["image_a"])
        out = await backend.compare(key_a, a, b)
        took = (time.perf_counter() - start) * 1e3
        return CompareResponse(**out, model=key_a, took_ms=took)

    @router.get("/images/{image_id}/thumbnail", response_class=Response)
    async def thumbnail(image_id: str, size: int = Query(128, ge=16, le=512)) -> Response:
        """PNG thumbnail of a gallery image."""
        if not security.valid_image_id(image_id):
            raise ApiError(422, "invalid", "image id must be a plain token", "image_id")
        png = await backend.thumbnail(image_id, size)
        if png is None:
            raise ApiError(404, "not_found", f"no gallery image with id {image_id!r}", "image_id")
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    @router.get("/model")
    async def model() -> dict[str, Any]:
        """Which model version each deployment serves (name, version, alias, metrics, ...)."""
        info = await backend.info()
        emb = info["embedder"]
        top = {k: emb.get(k) for k in ("name", "version", "alias", "key", "model_uri")}
        keys = {k: v.get("key") for k, v in info.items()}
        # One version everywhere unless a swap is under way (then requests still use one each).
        swapping = len(set(keys.values())) > 1 or any(v.get("swapping") for v in info.values())
        # No filesystem path in an answer (workdir, weights dir, bundle path, MLflow store).
        return strip_paths({**top, "swapping": swapping, "info": emb, "deployments": keys})

    return router


def install_request_metrics(app: FastAPI) -> None:
    """Count and time every answer by route template (never the raw path: one series per
    route, whatever the image ids) and status; unhandled errors count as 500."""

    @app.middleware("http")
    async def record(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.request_done(endpoint, status, (time.perf_counter() - start) * 1e3)


def create_api(backend: Backend, key_digests: tuple[str, ...], limits: Limits) -> FastAPI:
    """The whole HTTP surface: /v1 API (keyed), /healthz, the page at / and /static, the
    docs (/docs, /redoc), with security headers on every answer."""
    app = FastAPI(
        title="medray",
        version="1",
        description="Similar-image search, classification and comparison over a medical "
        "image archive. Send `Authorization: Bearer <key>` to every /v1 route.",
        docs_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN: ours do not
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    install_request_metrics(app)
    install_docs(app)  # Swagger UI and ReDoc from packaged files, no CDN
    app.include_router(api_router(backend, limits, key_digests))

    @app.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: no key needed, touches no model."""
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
