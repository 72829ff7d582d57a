"""The web cabinet page: plain HTML, script and style served by the app itself (`GET /cabinet`), no build step.

A specialist signs in by phone, sees the day's consultations, chats live, attaches files and calls the patient; a
patient chats and takes the call. The calls themselves are the call page's client (`/call/call.js`), loaded as
it is: one socket per page carries the chat's events and the calls'. The page is public (it holds no data); the
tokens live in the tab's sessionStorage and go out only as a bearer header, never in a URL. The policy lets the
page load only this origin's scripts and styles and talk only to this origin (uploads go through the API's
multipart route, not to a storage URL elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get

from app.access import PUBLIC

STATIC = Path(__file__).resolve().parent / "static"
PAGE_PATH = "/cabinet"

_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
           "media-src 'self' blob: mediastream:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a redeploy's page and script arrive together
    "Permissions-Policy": "camera=(self), microphone=(self), geolocation=()",
}
# read once: three small files, served from memory
_FILES = {name: (STATIC / name).read_bytes() for name in ("cabinet.html", "cabinet.js", "cabinet.css")}


def _answer(name: str, media_type: str) -> Response[bytes]:
    return Response(_FILES[name], media_type=media_type, headers=_HEADERS)


@get(PAGE_PATH, opt=PUBLIC, include_in_schema=False)
async def cabinet_page() -> Response[bytes]:
    return _answer("cabinet.html", "text/html; charset=utf-8")


@get(f"{PAGE_PATH}/cabinet.js", opt=PUBLIC, include_in_schema=False)
async def cabinet_script() -> Response[bytes]:
    return _answer("cabinet.js", "text/javascript; charset=utf-8")


@get(f"{PAGE_PATH}/cabinet.css", opt=PUBLIC, include_in_schema=False)
async def cabinet_style() -> Response[bytes]:
    return _answer("cabinet.css", "text/css; charset=utf-8")


CABINET_ROUTES = [cabinet_page, cabinet_script, cabinet_style]
