"""Structured JSON logs carrying a request id, and the ASGI middleware that assigns it."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
access_log = logging.getLogger("app.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (rid := request_id_var.get()) is not None:
            entry["request_id"] = rid
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):  # our access log replaces it
        logging.getLogger(noisy).disabled = True


def request_id_middleware(log_requests: bool) -> Any:
    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] not in ("http", "websocket"):
                await app(scope, receive, send)
                return
            given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
            rid = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
            token = request_id_var.set(rid)
            started, status = time.perf_counter(), 0

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            finally:
                if log_requests:
                    access_log.info("request", extra={
                        "method": scope.get("method", "WS"), "path": scope["path"], "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 2)})
                request_id_var.reset(token)

        return middleware

    return factory
