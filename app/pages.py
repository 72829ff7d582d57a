"""The browser pages the app serves itself (the call page, the web cabinet): plain files read once and served
from memory under one policy. The policy lets a page load only this origin's scripts and styles and talk only to
this origin; nothing is inline, nothing comes from elsewhere, no form is ever submitted."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from litestar import Response, get

from app.access import PUBLIC

POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
          "media-src 'self' blob: mediastream:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a redeploy's page and script arrive together
    # the pages ask for the camera and microphone of this origin only
    "Permissions-Policy": "camera=(self), microphone=(self), geolocation=()",
}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}


def page_routes(path: str, directory: Path, page: str, assets: Sequence[str]) -> list[Any]:
    """`GET path` answers the page, `GET path/<asset>` each asset; all public (they hold no data)."""
    def serving(name: str) -> Any:
        body, media_type = (directory / name).read_bytes(), MEDIA_TYPES[Path(name).suffix]

        async def answer() -> Response[bytes]:
            return Response(body, media_type=media_type, headers=HEADERS)

        answer.__name__ = f"page_{path.strip('/')}_{name.replace('.', '_')}"
        return answer

    return [get(path if name == page else f"{path}/{name}", opt=PUBLIC, include_in_schema=False)(serving(name))
            for name in (page, *assets)]
