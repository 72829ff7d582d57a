"""Authentication: the bearer access token becomes the request's Viewer, without touching the database."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import Scopes

from app.errors import NotAuthenticated


class TokenAuthMiddleware(AbstractAuthenticationMiddleware):
    """Routes marked opt={"exclude_from_auth": True} (and the service paths) skip it; all others need a token."""

    def __init__(self, app: Any, exclude: list[str], scopes: Scopes | None = None) -> None:
        super().__init__(app, exclude=exclude, scopes=scopes)

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not token and connection.scope["type"] == ScopeType.WEBSOCKET:
            token, scheme = connection.query_params.get("token", ""), "bearer"  # browsers cannot set headers
        if scheme.lower() != "bearer" or not token:
            raise NotAuthenticated("authentication required", "token_missing")
        viewer = connection.app.state.tokens.viewer_from(token.strip())
        return AuthenticationResult(user=viewer, auth=token)
