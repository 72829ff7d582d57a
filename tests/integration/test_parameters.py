"""Every query and path parameter of every route, at its extremes, zone-less and malformed, is a clear 4xx.

The routes come from the app's OpenAPI document, so a new route or parameter is covered without a new test.
Each is called as every role that may call it (the roles a bare call does not refuse with 401 or 403).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from litestar.testing import AsyncTestClient

from tests.conftest import Session

ZERO = "00000000-0000-0000-0000-000000000000"
# the same values for every parameter whatever its type: a type the route does not expect is bad input too
VALUES = [
    "0001-01-01", "9999-12-31", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",  # the calendar's ends
    "0001-01-01T00:00:00", "2026-06-01T10:00:00", "2026-06-01T10:00",  # no zone
    "1999-12-31", "2100-01-01", f"2026-06-01T10:00:00|{ZERO}", f"2026-06-01T10:00:00+03:00|{ZERO}",
    f"9999-12-31T23:59:59+00:00|{ZERO}", ZERO, "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "-1", "0", "1", "2147483648", "9" * 40, "1e309", "nan", "",
    "not-a-value", "x" * 20_000, "Europe/Nowhere", "../../etc/passwd", "\x00", "%ff", "'; drop table --",
]
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
ROLES = ("admin", "registrar", "doctor", "patient")
SIGNS_OUT = {"/api/v1/auth/logout"}  # calling it ends the session the walk goes on with (it takes no parameters)


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield method.upper(), path, op.get("parameters", [])


def bounds(param: dict[str, Any]) -> list[str]:
    """The declared edges of a parameter and one past each."""
    schema = param.get("schema", {})
    found: list[str] = []
    for option in [schema, *schema.get("oneOf", []), *schema.get("anyOf", [])]:
        for key, step in (("minimum", -1), ("maximum", 1), ("exclusiveMinimum", 0), ("exclusiveMaximum", 0)):
            if isinstance(option.get(key), int | float):
                found += [str(option[key]), str(option[key] + step)]
        if isinstance(option.get("maxLength"), int):
            found.append("a" * (option["maxLength"] + 1))
    return found


def url(path: str, path_params: dict[str, str]) -> str:
    for name in re.findall(r"\{(\w+)\}", path):
        path = path.replace("{" + name + "}", quote(path_params.get(name, ZERO), safe=""))
    return path


def assert_answer(answer: Any, what: Any) -> None:
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:500])
    if answer.status_code >= 400:
        body = answer.json()
        assert set(body) == {"status_code", "detail", "extra"}, (what, body)
        assert body["status_code"] == answer.status_code, (what, body)
        assert isinstance(body["detail"], str), (what, body)
        assert body["detail"], (what, body)
        assert SNAKE.match(str(body["extra"].get("reason"))), (what, body)


@pytest.fixture
async def callers(patient: Session, admin: Session, staff: Callable[..., Any],
                  specialist: Callable[..., Any]) -> dict[str, Session]:
    return {"admin": admin, "registrar": await staff("registrar"), "doctor": await specialist(),
            "patient": patient}


async def allowed_roles(client: AsyncTestClient[Any], callers: dict[str, Session], method: str,
                        target: str) -> list[dict[str, str]]:
    """The headers of every role a bare call of the route does not refuse for who it is."""
    allowed = []
    for role in ROLES:
        answer = await client.request(method, target, headers=callers[role].headers)
        assert_answer(answer, (method, target, role))
        if answer.status_code not in (401, 403):
            allowed.append(callers[role].headers)
    return allowed or [{}]  # nobody signed in passes: try it anonymously too (a public route refusing a token)


async def test_every_parameter_at_its_edges_is_a_clear_4xx(client: AsyncTestClient[Any],
                                                           callers: dict[str, Session]) -> None:
    schema = client.app.openapi_schema.to_schema()
    covered = 0
    for method, path, params in operations(schema):
        if not path.startswith("/api/") or not params or path in SIGNS_OUT:
            continue
        who = await allowed_roles(client, callers, method, url(path, {}))
        query = [p for p in params if p.get("in") == "query"]
        in_path = [p for p in params if p.get("in") == "path"]
        for headers in who:
            for param in query:
                for value in VALUES + bounds(param):
                    answer = await client.request(method, url(path, {}), params={param["name"]: value},
                                                  headers=headers)
                    assert_answer(answer, (method, path, param["name"], value[:40]))
                    covered += 1
            for value in VALUES:  # every query parameter at once at the same edge (from and to together)
                if query and len(value) * len(query) < 60_000:  # within what a client library sends at all
                    answer = await client.request(method, url(path, {}), headers=headers,
                                                  params={p["name"]: value for p in query})
                    assert_answer(answer, (method, path, "all", value[:40]))
            for param in in_path:
                for value in VALUES + bounds(param):
                    if not value or value in (".", ".."):
                        continue  # not a path segment at all
                    answer = await client.request(method, url(path, {param["name"]: value}), headers=headers)
                    assert_answer(answer, (method, path, param["name"], value[:40]))
                    covered += 1
    print("covered", covered)
    assert covered > 1000  # the walk found the routes (it counts requests, so it cannot silently pass)


async def test_the_slot_feed_refuses_the_ends_of_the_calendar(client: AsyncTestClient[Any]) -> None:
    for params in ({"to": "9999-12-31"}, {"from": "0001-01-01"}, {"from": "9999-12-31"},
                   {"from": "2026-01-01T00:00:00+14:00", "to": "9999-12-31T23:59:59-14:00"}):
        answer = await client.get("/api/v1/slots/feed", params=params)
        assert answer.status_code == 422, (params, answer.text)
        assert answer.json()["extra"]["reason"] in ("time_out_of_range", "time_invalid")


async def test_a_calendar_cursor_needs_its_offset(client: AsyncTestClient[Any], patient: Session) -> None:
    for cursor in (f"2026-06-01T10:00:00|{ZERO}", f"9999-12-31T23:59:59-14:00|{ZERO}", "x|y", "|"):
        answer = await client.get("/api/v1/consultations", params={"cursor": cursor}, headers=patient.headers)
        assert answer.status_code == 422, (cursor, answer.text)
        assert answer.json()["extra"]["reason"] == "cursor_invalid"
    fine = await client.get("/api/v1/consultations", params={"cursor": f"2026-06-01T10:00:00+03:00|{ZERO}"},
                            headers=patient.headers)
    assert fine.status_code == 200, fine.text


async def test_declared_lengths_of_query_parameters_hold(client: AsyncTestClient[Any],
                                                         specialist: Callable[..., Any]) -> None:
    doctor = await specialist()
    long = await client.get("/api/v1/my-patients", params={"q": "x" * 20_000}, headers=doctor.headers)
    assert long.status_code == 422, long.text
    assert long.json()["extra"]["reason"] == "invalid_input"
    assert "q (query parameter)" in long.json()["detail"]
    fine = await client.get("/api/v1/my-patients", params={"q": "x" * 100}, headers=doctor.headers)
    assert fine.status_code == 200, fine.text
