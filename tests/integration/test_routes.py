"""Every route declares who may call it: a guard, or an explicit public mark."""

from __future__ import annotations

import re
from typing import Any

from litestar.testing import AsyncTestClient

SERVICE_PREFIXES = ("/health", "/metrics", "/schema")


def handlers_of(route: Any) -> list[Any]:
    return list(getattr(route, "route_handlers", None) or [route.route_handler])  # a WebSocket route has one


async def test_every_route_is_guarded_or_public(client: AsyncTestClient[Any]) -> None:
    unguarded = []
    for route in client.app.routes:
        if route.path.startswith(SERVICE_PREFIXES):
            continue
        for handler in handlers_of(route):
            if getattr(handler, "http_methods", None) == {"OPTIONS"}:  # Litestar's own CORS preflight answer
                continue
            public = handler.opt.get("exclude_from_auth") is True
            if not public and not handler.resolve_guards():
                unguarded.append((route.path, handler.handler_name))
    assert unguarded == []


async def test_public_routes_are_only_the_login_steps(client: AsyncTestClient[Any]) -> None:
    public = sorted(
        route.path for route in client.app.routes for handler in handlers_of(route)
        if handler.opt.get("exclude_from_auth") and not route.path.startswith(SERVICE_PREFIXES)
    )
    # the login steps, the catalogue a patient or partner browses before signing in, the payment
    # provider's notifications (trusted for nothing: each is checked back with the provider), and the local
    # object store's signed URLs (GET and PUT: the signature is the credential, checked by the store), and the
    # browser call page with its script and style (static files holding no data: the page signs in itself)
    assert public == ["/api/v1/auth/otp", "/api/v1/auth/refresh", "/api/v1/auth/token",
                      "/api/v1/objects/{key:path}", "/api/v1/objects/{key:path}",
                      "/api/v1/payments/yookassa/notifications", "/api/v1/services",
                      "/api/v1/slots/feed", "/api/v1/specialists", "/api/v1/specialties",
                      "/call", "/call/call.css", "/call/call.js"]


async def test_every_api_route_refuses_an_anonymous_caller(client: AsyncTestClient[Any]) -> None:
    for route in client.app.routes:
        if not route.path.startswith("/api/") or not hasattr(route, "route_handlers"):  # sockets: test_gateway
            continue
        path = re.sub(r"\{\w+:uuid\}", "00000000-0000-0000-0000-000000000000", route.path)
        for handler in handlers_of(route):
            if handler.opt.get("exclude_from_auth"):
                continue
            for method in handler.http_methods - {"OPTIONS", "HEAD"}:
                answer = await client.request(method, path)
                assert answer.status_code == 401, (method, path)
