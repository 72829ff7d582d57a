"""The call page: a small, complete browser call client served by the app itself (`GET /call`).

A clinic's web cabinet can copy it as it is: no CDN, no build step, nothing loaded from elsewhere. The page is
public (it holds no data); it takes the access token from the URL fragment (`/call#token=…`, which a browser
never sends to a server, so it never reaches a log) or from its sign-in form, keeps it in memory only, and
sends it as a bearer header. Its socket opens with a single-use ticket (`POST /api/v1/ws/ticket`), so no
token travels in a URL. The policy (app/pages.py) lets the page load only its own script and style and talk
only to this origin; the form is never submitted (a token must not end up in a query string).
"""

from __future__ import annotations

from pathlib import Path

from app.pages import page_routes

PAGE_PATH = "/call"
PAGE_ROUTES = page_routes(PAGE_PATH, Path(__file__).resolve().parent / "static", "call.html",
                          ["call.js", "call.css"])
