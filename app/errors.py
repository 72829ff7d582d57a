"""Domain errors and the one handler that turns any error into API.md's body."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from sqlalchemy.exc import IntegrityError, OperationalError

log = logging.getLogger("app.errors")


class DomainError(Exception):
    """A rule refused the request; `reason` is the stable code clients branch on."""

    status_code: ClassVar[int] = 422

    def __init__(self, detail: str, reason: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra: dict[str, Any] = {"reason": reason, **extra} if reason else dict(extra)
        self.headers: dict[str, str] = {}


class Invalid(DomainError):
    status_code = 422


class NotAuthenticated(DomainError):
    status_code = 401


class Forbidden(DomainError):
    status_code = 403


class NotVisible(DomainError):
    """Absent and not yours look the same, so a stranger learns nothing."""

    status_code = 404

    def __init__(self, detail: str = "not found", **extra: Any) -> None:
        super().__init__(detail, **extra)


class Conflict(DomainError):
    status_code = 409


class TooMany(DomainError):
    status_code = 429

    def __init__(self, detail: str, retry_after: int, reason: str = "rate_limited") -> None:
        super().__init__(detail, reason, retry_after=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class Unavailable(DomainError):
    status_code = 503


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    headers: dict[str, str] = {}
    if isinstance(exc, DomainError):
        code, detail, extra, headers = exc.status_code, exc.detail, exc.extra, exc.headers
    elif isinstance(exc, ValidationException):  # Litestar says 400; the contract says 422
        code, detail = 422, "invalid input"
        extra = {"reason": "invalid_input", "errors": exc.extra or []}
    elif isinstance(exc, RecursionError):  # msgspec's answer to JSON nested thousands deep
        code, detail, extra = 422, "invalid input: nested too deeply", {"reason": "invalid_input"}
    elif isinstance(exc, HTTPException):
        code, detail = exc.status_code, exc.detail
        extra = exc.extra if isinstance(exc.extra, dict) else {}
        headers = dict(exc.headers or {})
    elif isinstance(exc, IntegrityError):  # a race the service did not foresee: the row changed meanwhile
        code, detail, extra = 409, "conflicting change, try again", {"reason": "conflict"}
    elif isinstance(exc, OperationalError) and "locked" in str(exc.orig):  # SQLite: another writer held on
        code, detail, extra, headers = 503, "busy, try again", {"reason": "busy"}, {"Retry-After": "1"}
    else:
        code, detail, extra = 500, "internal error", {}
    if code >= 500:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return Response(
        {"status_code": code, "detail": detail, "extra": extra}, status_code=code, headers=headers
    )
