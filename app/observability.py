"""Structured JSON logs carrying a request id, Prometheus metrics, and the middleware that feeds both."""

from __future__ import annotations

import asyncio
import gc
import hmac
import inspect
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
access_log = logging.getLogger("app.access")


def _phone(found: re.Match[str]) -> str:
    """10-15 digits, with or without +, spaces, dashes or parentheses, as people write phones; not a bare run
    starting with 1 (a Unix time in seconds or milliseconds, a counter). Dots and colons never join digits here,
    and nothing glued to a letter, a dot, a colon or a dash counts (but "tel:"), so UUIDs, request ids, times and
    durations stay."""
    text = found.group()
    if text[0] == "1" and text.isdigit():
        return text
    return "[redacted-phone]"


# Secrets and personal data a log line must never carry, wherever they turn up: URLs (uvicorn logs a socket's
# path with its query), headers, exception texts, JSON bodies in messages.
_REDACTIONS: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"(?i)\b((?:access_|refresh_)?token|ticket|code|otp|phone|password|secret|signature)=[^&\s\"']+"),
     r"\1=[redacted]"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [redacted]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"), "[redacted]"),  # a JWT anywhere
    (re.compile(r"""(?i)(["'](?:(?:access_|refresh_)?token|ticket|code|phone|full_name|name|text)["']\s*:\s*)"""
                r"""(["'])(?:\\.|(?!\2).)*\2"""), r"\1\2[redacted]\2"),
    (re.compile(r"(?:\+|(?<=tel:)|(?<![\w.:+-]))\(?\d(?:[ ()-]{0,2}\d){9,14}(?!\w|[.:-]\d)"), _phone),
    # database errors quote the values they were given: SQLAlchemy's "[parameters: ...]", PostgreSQL's
    # "Key (phone)=(...)" and asyncpg's "invalid input for query argument $1: ..."
    (re.compile(r"\[parameters: [^\n]*"), "[parameters: redacted]"),
    (re.compile(r"(Key \([^)]*\))=\([^\n]*?\)( already exists| is not present|\.|$)", re.M), r"\1=([redacted])\2"),
    (re.compile(r"(query argument \$\d+: )[^\n]*"), r"\1[redacted]"),
]


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any) -> Any:
    """An extra as the JSON line will carry it, redacted. Containers are encoded first, so the rules that go by
    a key ("full_name": ...) see the keys; numbers, booleans and None stay what they are (statuses, durations)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict | list | tuple | set | frozenset):
        try:
            encoded = redact(json.dumps(list(value) if isinstance(value, set | frozenset) else value, default=str))
        except (TypeError, ValueError):  # keys JSON cannot carry, a cycle: the text the formatter would fall to
            return redact(str(value))
        try:
            return json.loads(encoded)
        except ValueError:  # a redaction cut through an escape: the redacted text, as text
            return encoded
    return redact(str(value))  # what JsonFormatter would write for it (default=str)


class RedactingFilter(logging.Filter):
    """Rewrites every record (message, arguments, extras of any shape) without tokens, tickets, codes or phones."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed format: keep the template alone
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS:
                record.__dict__[key] = redact_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


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
        if record.exc_text:
            entry["exc"] = record.exc_text
        elif record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):  # our access log replaces it
        logging.getLogger(noisy).disabled = True


REQUESTS = Counter("clinic_requests_total", "HTTP requests answered", ["method", "path", "status_code"])
LATENCY = Histogram("clinic_request_duration_seconds", "Time to answer an HTTP request", ["method", "path"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
OPEN_WEBSOCKETS = Gauge("clinic_open_websockets", "WebSocket connections open on this process")
SOCKET_EVENTS = Counter("clinic_websocket_events_sent_total", "Events written to WebSockets on this process")
SOCKET_RESUMES = Counter("clinic_websocket_resumes_total", "Resumes asked for on WebSockets (replays from an event id)")
SOCKETS_CLOSED = Counter("clinic_websockets_closed_by_server_total",
                         "WebSockets this process closed: too slow to keep up, silent past the heartbeat, replaced or "
                         "signed out (kicked), or a frame too big", ["reason"])


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
_AFTER_COMMIT = "metrics_after_commit"


def count_after_commit(session: AsyncSession | Session, count: Callable[[], None]) -> None:
    """Run `count` (cheap: a metric's inc or observe) once the session's transaction commits, never when it rolls
    back: a change is counted when it happened, also when the request's own commit comes after the service."""
    session.info.setdefault(_AFTER_COMMIT, []).append(count)


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint released: the transaction itself may still roll back
        return
    for count in session.info.pop(_AFTER_COMMIT, ()):
        count()


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)  # a savepoint's rollback too: rather uncounted than counted wrongly


def metrics_text() -> bytes:
    return generate_latest(REGISTRY)


def metrics_allowed(authorization: str, token: str | None) -> bool:
    """With METRICS_TOKEN set, only "Bearer <token>" (compared in constant time) reads the metrics."""
    return token is None or hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode())


async def serve_metrics(address: str, token: str | None) -> asyncio.Server:
    """METRICS_ADDRESS ("host:port"): GET /metrics on a listener of its own, apart from the public API port.

    Each worker process listens on it (SO_REUSEPORT), so a scrape reads one worker, as /metrics always did.
    """
    host, _, port = address.rpartition(":")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target = [*request_line.split(" "), "", ""][:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            if method == "GET" and target.split("?")[0] == "/metrics" and metrics_allowed(
                    headers.get("authorization", ""), token):
                status, kind, body = "200 OK", "text/plain; version=0.0.4", metrics_text()
            else:
                status, kind, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a scraper that went away or never spoke HTTP
        finally:
            writer.close()

    return await asyncio.start_server(answer, host or "127.0.0.1", int(port), reuse_port=True)


def request_id_middleware(log_requests: bool) -> Any:
    """Per request: an id (kept from X-Request-ID when sane), metrics by route template, one access log line
    (method, path, status, time, the caller's user id)."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
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
            except Exception as exc:  # answered further out (a refusal raised by a middleware, such as a 401)
                status = status or getattr(exc, "status_code", 500)
                raise
            finally:
                elapsed = time.perf_counter() - started
                template = scope.get("path_template") or "unmatched"  # bounded label values
                method = str(scope.get("method", ""))
                SERIES.observe(method, template, status, elapsed)
                if log_requests:  # the user by id only (the auth middleware has put the caller in the scope)
                    user_id = getattr(scope.get("user"), "id", None)
                    access_log.info("request", extra={"method": method, "path": scope["path"],
                                                      "status": status, "ms": round(elapsed * 1000, 2),
                                                      "user_id": str(user_id) if user_id else None})
                request_id_var.reset(token)

        return middleware

    return factory


def where_tasks_wait() -> list[str]:
    """Every pending task of the running loop with the chain of awaits it is suspended in, outermost first: what
    a stuck shutdown step is waiting for, logged when one does not end in time."""
    found = []
    for task in asyncio.all_tasks():
        chain: list[str] = []
        step: Any = task.get_coro()
        while step is not None:
            frame = next((f for f in (getattr(step, a, None) for a in ("cr_frame", "ag_frame", "gi_frame")) if f), None)
            if frame is None:
                if type(step).__name__ == "async_generator_asend":  # `async for`: go on into the generator
                    step = next((g for g in gc.get_referents(step) if inspect.isasyncgen(g)), None)
                    continue
                chain.append(type(step).__name__)  # a future, or an awaitable written in C
                break
            chain.append(f"{frame.f_code.co_filename.rsplit('/site-packages/', 1)[-1]}:{frame.f_lineno} "
                         f"{frame.f_code.co_name}")
            step = next((s for s in (getattr(step, a, None) for a in ("cr_await", "ag_await", "gi_yieldfrom")) if s),
                        None)
        found.append(f"{task.get_name()}: {' > '.join(chain)}")
    return found
