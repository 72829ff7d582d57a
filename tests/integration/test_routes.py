"""Every route says who may call it in one place: opt=PUBLIC (anyone), opt=only_roles(...) (those roles), or no
mark (any signed-in user: the auth middleware admits only a valid token, and the service decides what of the data
is theirs)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from litestar.testing import AsyncTestClient

from app.access import ROLES_OPT, Role

SERVICE_PREFIXES = ("/health", "/metrics", "/schema")


def handlers_of(route: Any) -> list[Any]:
    return list(getattr(route, "route_handlers", None) or [route.route_handler])  # a WebSocket route has one


async def test_who_may_call_a_route_is_its_mark_never_a_guard(client: AsyncTestClient[Any]) -> None:
    guarded, badly_marked = [], []
    for route in client.app.routes:
        for handler in handlers_of(route):
            if handler.resolve_guards():  # a guard would be a second place for the rule (and cost a copy)
                guarded.append((route.path, handler.handler_name))
            roles = handler.opt.get(ROLES_OPT)
            if roles is not None and (not roles or not all(isinstance(r, Role) for r in roles)
                                      or handler.opt.get("exclude_from_auth")):
                badly_marked.append((route.path, handler.handler_name))
    assert guarded == []
    assert badly_marked == []


async def test_public_routes_are_only_the_login_steps(client: AsyncTestClient[Any]) -> None:
    public = sorted(
        route.path for route in client.app.routes for handler in handlers_of(route)
        if handler.opt.get("exclude_from_auth") and not route.path.startswith(SERVICE_PREFIXES)
    )
    # the login steps, the catalogue a patient or partner browses before signing in, the payment
    # provider's notifications (trusted for nothing: each is checked back with the provider), and the local
    # object store's signed URLs (GET and PUT: the signature is the credential, checked by the store), and the
    # browser call page and the web cabinet with their scripts and styles (static files holding no data: the pages
    # sign in themselves), and the FHIR server's CapabilityStatement (what it serves, no data)
    assert public == ["/api/v1/auth/otp", "/api/v1/auth/refresh", "/api/v1/auth/token",
                      "/api/v1/objects/{key:path}", "/api/v1/objects/{key:path}",
                      "/api/v1/payments/yookassa/notifications", "/api/v1/services",
                      "/api/v1/slots/feed", "/api/v1/specialists", "/api/v1/specialties",
                      "/cabinet", "/cabinet/cabinet.css", "/cabinet/cabinet.js",
                      "/call", "/call/call.css", "/call/call.js", "/fhir/R4/metadata"]


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


async def test_every_role_marked_route_refuses_every_other_role(client: AsyncTestClient[Any]) -> None:
    tokens = client.app.state.tokens
    for route in client.app.routes:
        if not hasattr(route, "route_handlers"):
            continue
        path = re.sub(r"\{\w+:uuid\}", "00000000-0000-0000-0000-000000000000", route.path)
        path = re.sub(r"\{\w+(:\w+)?\}", "x", path)
        for handler in handlers_of(route):
            allowed = handler.opt.get(ROLES_OPT)
            if allowed is None:
                continue
            for role in set(Role) - allowed:
                headers = {"Authorization": f"Bearer {tokens.issue_access(uuid.uuid4(), [role.value])}"}
                for method in handler.http_methods - {"OPTIONS", "HEAD"}:
                    answer = await client.request(method, path, headers=headers)
                    assert answer.status_code == 403, (method, path, role)
                    assert answer.json()["extra"]["reason"] == "forbidden", (method, path, role)
