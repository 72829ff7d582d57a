"""The call page: a small, complete browser call client served by the app itself (`GET /call`).

A clinic's web cabinet can copy it as it is: no CDN, no build step, nothing loaded from elsewhere. The page is
public (it holds no data); it takes the access token from the URL fragment (`/call#token=…`, which a browser
never sends to a server, so it never reaches a log) or from its sign-in form, keeps it in memory only, and
sends it as a bearer header. Its socket opens with a single-use ticket (`POST /api/v1/ws/ticket`), so no
token travels in a URL. The policy below lets the page load only its own script and style and talk only to
this origin; the form is never submitted (a token must not end up in a query string).
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get

from app.access import PUBLIC

STATIC = Path(__file__).resolve().parent / "static"
PAGE_PATH = "/call"

_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
           "media-src 'self' blob: mediastream:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a redeploy's page and script arrive together
    # the page asks for the camera and microphone of this origin only
    "Permissions-Policy": "camera=(self), microphone=(self), geolocation=()",
}
# read once: three small files, served from memory
_FILES = {name: (STATIC / name).read_bytes() for name in ("call.html", "call.js", "call.css")}


def _answer(name: str, media_type: str) -> Response[bytes]:
    return Response(_FILES[name], media_type=media_type, headers=_HEADERS)


@get(PAGE_PATH, opt=PUBLIC, include_in_schema=False)
async def call_page() -> Response[bytes]:
    return _answer("call.html", "text/html; charset=utf-8")


@get(f"{PAGE_PATH}/call.js", opt=PUBLIC, include_in_schema=False)
async def call_script() -> Response[bytes]:
    return _answer("call.js", "text/javascript; charset=utf-8")


@get(f"{PAGE_PATH}/call.css", opt=PUBLIC, include_in_schema=False)
async def call_style() -> Response[bytes]:
    return _answer("call.css", "text/css; charset=utf-8")


PAGE_ROUTES = [call_page, call_script, call_style]
