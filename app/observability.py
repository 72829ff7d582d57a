"""Structured JSON logs carrying a request id, Prometheus metrics, and the middleware that feeds both."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest

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
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS and k != "color_message"})
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


REQUESTS = Counter("clinic_requests_total", "HTTP requests answered", ["method", "path", "status_code"])
LATENCY = Histogram("clinic_request_duration_seconds", "Time to answer an HTTP request", ["method", "path"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
OPEN_WEBSOCKETS = Gauge("clinic_open_websockets", "WebSocket connections open on this process")


class _Series:
    """prometheus_client's label lookup is slow on a hot path: keep the children we have used."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], Any] = {}
        self.latencies: dict[tuple[str, str], Any] = {}

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        count = self.counts.get((method, path, status))
        if count is None:
            count = self.counts[(method, path, status)] = REQUESTS.labels(method, path, str(status))
        latency = self.latencies.get((method, path))
        if latency is None:
            latency = self.latencies[(method, path)] = LATENCY.labels(method, path)
        count.inc()
        latency.observe(seconds)


SERIES = _Series()


def metrics_text() -> bytes:
    return generate_latest(REGISTRY)


def request_id_middleware(log_requests: bool) -> Any:
    """Per request: an id (kept from X-Request-ID when sane), metrics by route template, one access log line."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
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
                elapsed = time.perf_counter() - started
                template = scope.get("path_template") or "unmatched"  # bounded label values
                method = str(scope.get("method", ""))
                SERIES.observe(method, template, status, elapsed)
                if log_requests:
                    access_log.info("request", extra={"method": method, "path": scope["path"],
                                                      "status": status, "ms": round(elapsed * 1000, 2)})
                request_id_var.reset(token)

        return middleware

    return factory
