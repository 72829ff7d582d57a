"""The web cabinet page: plain HTML, script and style served by the app itself (`GET /cabinet`), no build step.

A specialist signs in by phone, sees the day's consultations, chats live, attaches files and calls the patient; a
patient chats and takes the call. The calls themselves are the call page's client (`/call/call.js`), loaded as
it is: one socket per page carries the chat's events and the calls'. The page is public (it holds no data); the
tokens live in the tab's sessionStorage and go out only as a bearer header, never in a URL. The policy
(app/pages.py) lets the page load only this origin's scripts and styles and talk only to this origin (uploads go
through the API's multipart route, not to a storage URL elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from app.pages import page_routes

PAGE_PATH = "/cabinet"
CABINET_ROUTES = page_routes(PAGE_PATH, Path(__file__).resolve().parent / "static", "cabinet.html",
                             ["cabinet.js", "cabinet.css"])
