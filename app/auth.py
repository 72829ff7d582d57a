"""Authentication: the bearer access token becomes the request's Viewer, without touching the database.

A socket may carry its credential three ways, best first: a single-use ticket (`?ticket=`, issued by
`POST /api/v1/ws/ticket` and good for WS_TICKET_SECONDS), the subprotocol pair `bearer, <token>` (the
one header a browser lets a socket set), or `?token=` (kept working; logs redact it).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, Protocol

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import Scopes
from redis.asyncio import Redis

from app.access import check_roles
from app.errors import NotAuthenticated

TICKETS_KEPT = 100_000  # tickets in flight in one process at most (the embedded store); each lives seconds


class Tickets(Protocol):
    async def issue(self, token: str) -> str: ...

    async def take(self, ticket: str) -> str | None: ...


def _ticket_key(ticket: str) -> str:
    return "ws-ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


class InProcessTickets:
    """The embedded profile's tickets: one process, so a dict; a ticket is taken once or expires."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._tickets: dict[str, tuple[str, float]] = {}

    async def issue(self, token: str) -> str:
        now = time.monotonic()
        if len(self._tickets) >= TICKETS_KEPT:
            self._tickets = {k: v for k, v in self._tickets.items() if v[1] > now}
            if len(self._tickets) >= TICKETS_KEPT:  # a flood of unused tickets: the oldest go first
                self._tickets.pop(next(iter(self._tickets)))
        ticket = secrets.token_urlsafe(32)
        self._tickets[_ticket_key(ticket)] = (token, now + self.seconds)
        return ticket

    async def take(self, ticket: str) -> str | None:
        found = self._tickets.pop(_ticket_key(ticket), None)
        return found[0] if found is not None and found[1] > time.monotonic() else None


class RedisTickets:
    """Tickets every process honours: stored hashed with their lifetime, taken with GETDEL (once, atomically)."""

    def __init__(self, redis: Redis, seconds: float) -> None:
        self.redis = redis
        self.milliseconds = max(1, int(seconds * 1000))

    async def issue(self, token: str) -> str:
        ticket = secrets.token_urlsafe(32)
        await self.redis.set(_ticket_key(ticket), token, px=self.milliseconds)
        return ticket

    async def take(self, ticket: str) -> str | None:
        found = await self.redis.getdel(_ticket_key(ticket))
        return found.decode() if isinstance(found, bytes) else found


class TokenAuthMiddleware(AbstractAuthenticationMiddleware):
    """Routes marked opt={"exclude_from_auth": True} (and the service paths) skip it; all others need a token, and
    a route marked opt=only_roles(...) a token with one of those roles."""

    def __init__(self, app: Any, exclude: list[str], scopes: Scopes | None = None) -> None:
        super().__init__(app, exclude=exclude, scopes=scopes)

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not token and connection.scope["type"] == ScopeType.WEBSOCKET:
            token, scheme = await socket_token(connection), "bearer"  # browsers cannot set headers
        if scheme.lower() != "bearer" or not token:
            raise NotAuthenticated("authentication required", "token_missing")
        viewer = connection.app.state.tokens.viewer_from(token.strip())
        check_roles(viewer, connection.route_handler.opt)
        return AuthenticationResult(user=viewer, auth=token)


async def socket_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    offered = [str(p).strip() for p in connection.scope.get("subprotocols") or ()]  # type: ignore[attr-defined]
    if len(offered) >= 2 and offered[0].lower() == "bearer":
        return offered[1]
    ticket = connection.query_params.get("ticket")
    if ticket:
        token = await connection.app.state.tickets.take(ticket)
        if token is None:
            raise NotAuthenticated("the socket ticket is unknown, already used or expired; ask for a new one",
                                   "ticket_invalid")
        return str(token)
    return str(connection.query_params.get("token", ""))
