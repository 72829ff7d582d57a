"""Domain errors and the one handler that turns any error into API.md's body."""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

import asyncpg
import botocore.exceptions
import redis.exceptions
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

log = logging.getLogger("app.errors")


class DomainError(Exception):
    """A rule refused the request; `reason` is the stable code clients branch on."""

    status_code: ClassVar[int] = 422
    default_reason: ClassVar[str] = "invalid_input"  # every refusal names a reason, even a generic one

    def __init__(self, detail: str, reason: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra: dict[str, Any] = {"reason": reason or self.default_reason, **extra}
        self.headers: dict[str, str] = {}


class Invalid(DomainError):
    status_code = 422


class NotAuthenticated(DomainError):
    status_code = 401
    default_reason = "not_authenticated"


class Forbidden(DomainError):
    status_code = 403
    default_reason = "forbidden"


class NotVisible(DomainError):
    """Absent and not yours look the same, so a stranger learns nothing."""

    status_code = 404
    default_reason = "not_found"

    def __init__(self, detail: str = "not found", **extra: Any) -> None:
        super().__init__(detail, **extra)


class Conflict(DomainError):
    status_code = 409
    default_reason = "conflict"


class TooMany(DomainError):
    status_code = 429

    def __init__(self, detail: str, retry_after: int, reason: str = "rate_limited") -> None:
        super().__init__(detail, reason, retry_after=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class Unavailable(DomainError):
    status_code = 503
    default_reason = "unavailable"
    retry_after = "2"  # seconds: a restarting service is back in a few, and clients must not hammer it meanwhile

    def __init__(self, detail: str, reason: str | None = None, **extra: Any) -> None:
        super().__init__(detail, reason, **extra)
        self.headers = {"Retry-After": self.retry_after}


# A service the API needs is down or restarting: 503 with Retry-After and the service's reason, never a 500.
# Found anywhere in the exception's chain (SQLAlchemy wraps the driver's error, a pool may raise the OS's).
_DOWN: tuple[tuple[type[BaseException], str], ...] = (
    (asyncpg.QueryCanceledError, "database_slow"),  # statement_timeout: the database is overloaded
    (asyncpg.PostgresConnectionError, "database_unavailable"),  # refused, dropped mid-statement
    (asyncpg.exceptions.OperatorInterventionError, "database_unavailable"),  # shutting down, starting up
    (asyncpg.InterfaceError, "database_unavailable"),  # "connection is closed"
    (redis.exceptions.ConnectionError, "redis_unavailable"),
    (redis.exceptions.TimeoutError, "redis_unavailable"),
    (botocore.exceptions.ConnectionError, "storage_unavailable"),  # endpoint unreachable, connect timeout
    (botocore.exceptions.HTTPClientError, "storage_unavailable"),  # connection closed, read timeout
)
_DETAILS = {"database_slow": "the database is slow to answer, try again",
            "database_unavailable": "the database is not reachable, try again",
            "redis_unavailable": "a service the API needs (Redis) is not reachable, try again",
            "storage_unavailable": "the document storage is not reachable, try again"}


def unavailable_reason(exc: BaseException) -> str | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        for kind, reason in _DOWN:
            if isinstance(err, kind):
                return reason
        if isinstance(err, DBAPIError) and err.connection_invalidated:
            return "database_unavailable"
        if isinstance(err, (ConnectionRefusedError, ConnectionResetError)):  # a pool connecting to a service
            return "unavailable"
        todo += [err.__cause__, err.__context__, getattr(err, "orig", None)]
    return None


# Reasons for refusals the framework raises before our code runs (routing, guards, body size).
FRAMEWORK_REASONS = {400: "bad_request", 401: "not_authenticated", 403: "forbidden", 404: "not_found",
                     405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
                     429: "rate_limited"}
FRAMEWORK_DETAILS = {404: "no such route", 405: "this route does not take that method",
                     413: "the request body is too large"}
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "array": "a list", "object": "an object", "null": "null", "decimal": "a decimal number",
               "uuid": "a UUID", "datetime": "a date and time", "date": "a date", "time": "a time",
               "bytes": "base64 text", "enum": "one of the allowed values"}
_PLACES = {"query": "query parameter", "path": "path parameter", "header": "header", "cookie": "cookie"}
_BOUNDS = ((" of length <= ", " of at most "), (" of length >= ", " of at least "), (" <= ", " of at most "),
           (" >= ", " of at least "), (" < ", " below "), (" > ", " above "))


def _types(match: re.Match[str]) -> str:
    names = [_TYPE_WORDS.get(t.strip(), t.strip()) for t in match.group(1).split("|")]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _refused_text(exc: BaseException) -> bool:
    """PostgreSQL's 22021 (character_not_in_repertoire: a NUL in text), raised by asyncpg or wrapped by SQLAlchemy."""
    return "22021" in (getattr(exc, "sqlstate", None), getattr(getattr(exc, "orig", None), "sqlstate", None),
                       getattr(getattr(getattr(exc, "orig", None), "__cause__", None), "sqlstate", None))


def plain(message: str) -> str:
    """msgspec's terse "Expected `int` <= 100" as words a client developer reads ("expected an integer of at
    most 100")."""
    text = re.sub(r"`([^`]*)`", _types, message.split(" - at ", 1)[0])
    for sign, words in _BOUNDS:
        text = text.replace(sign, words)
    text = re.sub(r"matching regex '.*'$", "in the documented format", text)
    text = re.sub(r"Invalid enum value '.*'$", "not one of the allowed values", text)
    return (text[:1].lower() + text[1:]).strip()


def _validation(errors: Any) -> tuple[str, dict[str, Any]]:
    """Litestar's ValidationException as one sentence naming each field, and a reason code."""
    items = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    if any(e.get("key") == "data" and e.get("message") == "'data'" for e in items):  # a KeyError: no body at all
        return "a JSON body is required", {"reason": "body_required"}
    shown = []
    for e in items:
        source = e.get("source") or ""
        key, source = str(e.get("key") or ""), str(getattr(source, "value", source))  # ParamType is an Enum
        if source == "body":  # a field's path in the body ("weekly[0].start"), or the body as a whole
            where = "the body" if key in ("", "data") else key
        else:
            where = f"{key} ({_PLACES.get(source, source)})" if source else key
        shown.append({"message": plain(str(e.get("message", ""))), "key": key, "source": source, "where": where})
    if not shown:
        return "the request is invalid", {"reason": "invalid_input", "errors": []}
    detail = "; ".join(f"{s['where']}: {s['message']}" if s["where"] else s["message"] for s in shown[:5])
    errors_out = [{k: v for k, v in s.items() if k != "where"} for s in shown]
    return f"invalid input: {detail}", {"reason": "invalid_input", "errors": errors_out}


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    headers: dict[str, str] = {}
    if isinstance(exc, DomainError):
        code, detail, extra, headers = exc.status_code, exc.detail, exc.extra, exc.headers
    elif isinstance(exc, ValidationException):  # Litestar says 400; the contract says 422
        code = 422
        detail, extra = _validation(exc.extra)
    elif isinstance(exc, RecursionError):  # msgspec's answer to JSON nested thousands deep
        code, detail, extra = 422, "invalid input: the body is nested too deeply", {"reason": "invalid_input"}
    elif isinstance(exc, HTTPException):
        code, detail = exc.status_code, exc.detail
        extra = dict(exc.extra) if isinstance(exc.extra, dict) else {}
        headers = dict(exc.headers or {})
        if code == 400 and isinstance(exc.__cause__, SerializationException):  # the contract says 422 for this
            code, detail, extra = 422, "the request body is not valid JSON", {"reason": "body_not_json"}
        elif code == 400 and re.search(r"['\"]", detail):  # e.g. a repr of a malformed header
            detail = "the request is malformed"
        detail = FRAMEWORK_DETAILS.get(code, detail)
        if code < 500:
            extra.setdefault("reason", FRAMEWORK_REASONS.get(code, "refused"))
    elif _refused_text(exc):  # a character the database cannot store, in a field no schema pattern covers
        code, detail, extra = 422, "the text holds a character that cannot be stored (NUL)", {"reason": "text_invalid"}
    elif isinstance(exc, IntegrityError):  # a race the service did not foresee: the row changed meanwhile
        code, detail, extra = 409, "conflicting change, try again", {"reason": "conflict"}
    elif isinstance(exc, OperationalError) and "locked" in str(exc.orig):  # SQLite: another writer held on
        code, detail, extra, headers = 503, "busy, try again", {"reason": "busy"}, {"Retry-After": "1"}
    elif (down := unavailable_reason(exc)) is not None:
        code, extra, headers = 503, {"reason": down}, {"Retry-After": Unavailable.retry_after}
        detail = _DETAILS.get(down, "a service the API needs is not reachable, try again")
        log.warning("a backing service is down", extra={"path": request.url.path, "reason": down,
                                                        "error": type(exc).__name__})
    else:
        code, detail, extra = 500, "internal error", {}
    if code >= 500 and code != 503:  # a 503 is a known state (logged above or by its raiser), not a defect
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return Response(
        {"status_code": code, "detail": detail, "extra": extra}, status_code=code, headers=headers
    )
