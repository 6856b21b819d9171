"""The API docs, offline: Swagger UI at /docs and ReDoc at /redoc, from files in a package.

FastAPI's own /docs loads Swagger UI from a public CDN, on the origin where the web page
keeps the API key, and shows a blank page offline. Here the assets come from the
`fastapi-offline` wheel (swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js,
favicon.png) mounted at /docs-assets, and each page carries a Content-Security-Policy that
allows scripts from this origin only: Swagger UI's inline start-up script by its SHA-256,
ReDoc's injected styles and its search worker (blob:).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"

_COMMON_CSP = [
    "default-src 'none'",
    "connect-src 'self'",
    "font-src 'self' data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
]


def assets_dir() -> Path:
    """The directory of the packaged Swagger UI and ReDoc files."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def inline_script_hashes(html: str) -> list[str]:
    """CSP source expressions ('sha256-...') of every inline <script> of `html`."""
    bodies = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
        for b in bodies
    ]


def swagger_page(root: str, openapi_url: str, title: str) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=f"{root}{openapi_url}",
        title=f"{title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
        oauth2_redirect_url=None,
        swagger_ui_parameters={"validatorUrl": None},  # no badge from a public validator
    )
    html = bytes(page.body).decode()
    scripts = " ".join(["'self'", *inline_script_hashes(html)])
    csp = [*_COMMON_CSP, f"script-src {scripts}", "style-src 'self'", "img-src 'self' data: blob:"]
    page.headers["Content-Security-Policy"] = "; ".join(csp)
    return page


def redoc_page(root: str, openapi_url: str, title: str) -> HTMLResponse:
    page = get_redoc_html(
        openapi_url=f"{root}{openapi_url}",
        title=f"{title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
        with_google_fonts=False,
    )
    csp = [
        *_COMMON_CSP,
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",  # ReDoc injects its styles at run time
        "img-src 'self' data:",
        "worker-src blob:",  # its search index runs in a worker built from a blob
    ]
    page.headers["Content-Security-Policy"] = "; ".join(csp)
    return page


def install_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets (the app must be built with docs_url=None and
    redoc_url=None so FastAPI's CDN pages are not registered)."""
    app.mount(ASSETS, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return swagger_page(request.scope.get("root_path", ""), openapi_url, app.title)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return redoc_page(request.scope.get("root_path", ""), openapi_url, app.title)
