"""Request bodies that stop arriving, or trickle in, are refused with 408 instead of holding the server.

The ASGI server bounds headers (app/http_head.py) but not bodies: a client that declares a body and sends it a
byte at a time would keep its request (and whatever the handler already holds for it) alive for as long as it
likes, and a few hundred such clients are a denial of service (slowloris). Every body must keep arriving: no gap
between two of its chunks longer than BODY_IDLE_SECONDS. A body on any route but the two that take a file's
bytes (every JSON body) must also be complete within BODY_SECONDS; a file (the direct upload, the local store's
PUT), declared or chunked, is bounded by the gap alone, as a slow phone may take minutes to send one at a
steady pace.

The refusal is raised from `receive`, so it reaches the handler's code where it waits for the body: an upload
aborts its object as for any other failure, and the answer is the API's usual body (reason `body_timeout`)
with `Connection: close` (the rest of that body is never read).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from app.errors import DomainError


class BodyTimedOut(DomainError):
    status_code = 408
    default_reason = "body_timeout"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {"Connection": "close"}


def body_timeouts(idle_seconds: float, whole_seconds: float, file_paths: tuple[str, ...]) -> Any:
    """The middleware factory (Litestar's `middleware=[...]`); `file_paths`: the prefixes of the file routes."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
                await app(scope, receive, send)
                return
            ends = None if scope["path"].startswith(file_paths) else time.monotonic() + whole_seconds
            complete = False

            async def timed_receive() -> ReceiveMessage:
                nonlocal complete
                if complete:  # the body is in: later receives wait for a disconnect, which takes its time
                    return await receive()
                wait = idle_seconds if ends is None else min(idle_seconds, ends - time.monotonic())
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimedOut("the request body stopped arriving or came too slowly") from None
                if message["type"] != "http.request" or not message.get("more_body", False):
                    complete = True
                return message

            await app(scope, timed_receive, send)

        return middleware

    return factory
