"""The dashboard: GET / serves one page (static/index.html and static/dashboard.js) where a user
pastes an API key and watches its fine-tuning jobs, their loss curves and events.

The page holds no data of its own: it calls the API with the key (kept in the browser tab's
sessionStorage), so it shows exactly what that key may read. Plotting is uPlot 1.6.32 (MIT,
static/uplot/LICENSE): dist/uPlot.iife.min.js and dist/uPlot.min.css of the npm package
uplot@1.6.32, served from here since the browser may have no internet.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from colaft.serve.routes.common import APIError

STATIC = Path(__file__).resolve().parents[1] / "static"
FILES = {"dashboard.js": "text/javascript", "uplot/uPlot.iife.min.js": "text/javascript",
         "uplot/uPlot.min.css": "text/css", "uplot/LICENSE": "text/plain"}
"""The files under /static/ (nothing else under the folder is served)."""

HEADERS = {  # scripts and styles from this server only; no framing; no referrer
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter()


@router.get("/", include_in_schema=False)
def index():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name:path}", include_in_schema=False)
def static(name: str):
    if name not in FILES:
        raise APIError(404, f"No such file: /static/{name}", code="not_found")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)
