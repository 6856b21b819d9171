"""Security headers on every answer of the HTTP app, errors included.

The page at `/` loads only its own script, style sheet and images (`/static`), calls only
its own API, and shows images from `blob:` (thumbnails fetched with the key) and `data:`
URLs (the query preview), so its Content-Security-Policy allows exactly that. The docs
pages (`medray.serving.docs`) set their own, wider policy on their response (an inline
script by hash for Swagger UI, injected styles and a blob: worker for ReDoc); the
middleware keeps a header a route already set. Nothing may frame the app (clickjacking),
browsers may not guess content types, no Referer leaves the origin, and API answers (which
carry data derived from patient images) are never stored by a cache. HSTS is left to the
TLS-terminating proxy in front of the app (it serves plain HTTP on loopback).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
"""The policy of the page at `/`, its static files, the API and every error."""

COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

REVALIDATED = ("/static/", "/docs-assets/")
"""Files that may be cached but must be revalidated (ETag) so an upgrade shows at once."""
PAGES = ("/", "/docs", "/redoc")


def cache_control(path: str) -> str:
    """`no-store` for API answers, health and errors; `no-cache` for the pages and assets."""
    if path in PAGES or path.startswith(REVALIDATED):
        return "no-cache"
    return "no-store"


def security_headers(path: str) -> dict[str, str]:
    """Every header the middleware adds to an answer for `path` (for handlers that answer
    outside it, such as the 500 handler Starlette runs in its outermost layer)."""
    return {
        **COMMON,
        "Content-Security-Policy": PAGE_CSP,
        "Cache-Control": cache_control(path),
    }


class SecurityHeaders:
    """Pure ASGI middleware: adds `security_headers(path)` to each HTTP response start,
    keeping any of them the route set itself (a docs page's CSP, a thumbnail's caching)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(scope.get("path", ""))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
