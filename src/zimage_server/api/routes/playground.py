"""The playground page at ``/`` and its static assets under ``/static``.

Plain HTML, CSS and JS with no build step. The page talks only to this origin (relative
URLs), and its Content-Security-Policy makes the browser enforce that: an API key typed
into the page can never be sent to another host.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def mount_playground(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static``."""
    # Mounted under /static, not at "/": a catch-all mount would turn 405s into 404s.
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
