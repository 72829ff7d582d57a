"""Every query and path parameter of every route, at its extremes, zone-less and malformed, is a clear 4xx.

The routes come from the app's OpenAPI document, so a new route or parameter is covered without a new test.
Each is called as every role that may call it (the roles a bare call does not refuse with 401 or 403). A value
invalid by the parameter's declaration (its type, format, enum, bounds, length; for `from`/`to` the years
2000-2099, for `tz` a known zone) must be refused with a 4xx; a valid one may be answered (or refused for
another reason), never with a 5xx.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
from litestar import Litestar, get
from litestar.params import FromPath, FromQuery
from litestar.testing import AsyncTestClient

from app.openapi import PARAMETERS, on_startup, openapi_config
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
                edge = option[key]
                edge = int(edge) if float(edge).is_integer() else edge  # 100.0 in the document is the integer 100
                found += [str(edge), str(edge + step)]
        if isinstance(option.get("maxLength"), int):
            found.append("a" * (option["maxLength"] + 1))
    return found


def _options(param: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    """The schemas a parameter's value may take, references resolved, null left out (null is "not given")."""
    schema = param.get("schema", {})
    found = []
    for option in [schema, *schema.get("oneOf", []), *schema.get("anyOf", [])]:
        if "$ref" in option:
            option = components.get(option["$ref"].rsplit("/", 1)[-1], {})
        if option.get("type") != "null" and not option.get("oneOf") and not option.get("anyOf"):
            found.append(option)
    return found


def _types(option: dict[str, Any]) -> set[str]:
    kind = option.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


def _in_the_calendar(value: str) -> bool:
    try:
        moment = datetime.fromisoformat(value)  # a date alone reads as its midnight; no zone: the caller's
    except ValueError:
        return False
    return 2000 <= moment.year <= 2099


def _a_zone(value: str) -> bool:
    try:
        ZoneInfo(value)
    except Exception:  # not found, or not a zone name at all ("../x")
        return False
    return True


def invalid(param: dict[str, Any], value: str, components: dict[str, Any]) -> bool:
    """Whether the value is wrong by the parameter's declaration alone, so that only a 4xx may answer it."""
    if "\x00" in value:
        return True
    if value == "":
        return False  # an empty query value may read as "not given"
    options = _options(param, components)
    lengths = [o["maxLength"] for o in [param.get("schema", {}), *options] if isinstance(o.get("maxLength"), int)]
    if lengths and len(value) > max(lengths):
        return True
    for option in options:
        if enum := [item for item in option.get("enum", []) if item is not None]:
            return value not in [str(item) for item in enum]
        if "integer" in _types(option):
            if not re.fullmatch(r"-?\d+", value):
                return True  # nan, 1e309, 1.5, words
            number = int(value)
            return ((isinstance(option.get("minimum"), int | float) and number < option["minimum"])
                    or (isinstance(option.get("maximum"), int | float) and number > option["maximum"]))
        if option.get("format") == "uuid":
            try:
                uuid.UUID(value)
            except ValueError:
                return True
            return False
    name = param["name"]
    if name in ("from", "to"):
        return not _in_the_calendar(value)
    if name == "tz":
        return not _a_zone(value)
    if name == "cursor":
        if "|" in value:
            return False  # a "time|id" cursor is judged by its route (test_a_calendar_cursor_needs_its_offset)
        try:
            uuid.UUID(value)  # the other cursors are the id of the last item of the page
        except ValueError:
            return True
    return False


def url(path: str, path_params: dict[str, str]) -> str:
    for name in re.findall(r"\{(\w+)\}", path):
        path = path.replace("{" + name + "}", quote(path_params.get(name, ZERO), safe=""))
    return path


def assert_answer(answer: Any, what: Any, refused: bool = False) -> None:
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:500])
    if refused:  # invalid by definition: accepting it would answer a question nobody could have asked
        assert 400 <= answer.status_code < 500, (what, "accepted", answer.status_code, answer.text[:300])
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
    components = schema.get("components", {}).get("schemas", {})
    covered = refusals = 0
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
                    refused = invalid(param, value, components)
                    assert_answer(answer, (method, path, param["name"], value[:40]), refused)
                    covered, refusals = covered + 1, refusals + refused
            for value in VALUES:  # every query parameter at once at the same edge (from and to together)
                if query and len(value) * len(query) < 60_000:  # within what a client library sends at all
                    answer = await client.request(method, url(path, {}), headers=headers,
                                                  params={p["name"]: value for p in query})
                    assert_answer(answer, (method, path, "all", value[:40]),
                                  any(invalid(p, value, components) for p in query))
            for param in in_path:
                for value in VALUES + bounds(param):
                    if not value or value in (".", ".."):
                        continue  # not a path segment at all
                    answer = await client.request(method, url(path, {param["name"]: value}), headers=headers)
                    refused = invalid(param, value, components)
                    assert_answer(answer, (method, path, param["name"], value[:40]), refused)
                    covered, refusals = covered + 1, refusals + refused
    print("covered", covered, "refusals required", refusals)
    assert covered > 1000  # the walk found the routes (it counts requests, so it cannot silently pass)
    assert refusals > covered // 2  # most values are wrong for most parameters: the classification is at work


async def test_the_slot_feed_refuses_the_ends_of_the_calendar(client: AsyncTestClient[Any]) -> None:
    for params in ({"to": "9999-12-31"}, {"from": "0001-01-01"}, {"from": "9999-12-31"},
                   {"from": "2026-01-01T00:00:00+14:00", "to": "9999-12-31T23:59:59-14:00"},
                   {"from": "2100-01-01"}, {"from": "2100-01-01T01:00:00"}, {"from": "1999-12-31T23:30:00-01:00"},
                   {"from": "2099-12-30", "to": "2100-01-01"}):  # a year outside as written, though not in UTC
        answer = await client.get("/api/v1/slots/feed", params=params)
        assert answer.status_code == 422, (params, answer.text)
        assert answer.json()["extra"]["reason"] in ("time_out_of_range", "time_invalid")
    for params in ({"from": "2099-12-25", "to": "2099-12-31"}, {"from": "2000-01-01T03:00:00", "to": "2000-01-02"}):
        fine = await client.get("/api/v1/slots/feed", params=params)  # the first and last days the window holds
        assert fine.status_code == 200, (params, fine.text)


async def test_search_text_with_a_control_character_is_refused(client: AsyncTestClient[Any],
                                                                specialist: Callable[..., Any]) -> None:
    doctor = await specialist()
    for q in ("\x00", "Iva\x00nov", "a\x1fb"):
        answer = await client.get("/api/v1/my-patients", params={"q": q}, headers=doctor.headers)
        assert answer.status_code == 422, (q, answer.text)
        assert answer.json()["extra"]["reason"] == "invalid_input"
    fine = await client.get("/api/v1/my-patients", params={"q": "Ivanov 916"}, headers=doctor.headers)
    assert fine.status_code == 200, fine.text


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


def test_start_up_names_the_parameters_nobody_explained(caplog: pytest.LogCaptureFixture) -> None:
    @get("/probe/{widget_ref:str}", sync_to_thread=False)
    def probe(widget_ref: FromPath[str], limit: FromQuery[int] = 5, colour: FromQuery[str | None] = None) -> str:
        return widget_ref

    # logging_config=None: Litestar's default one would replace the root handlers, caplog's among them
    app = Litestar(route_handlers=[probe], openapi_config=openapi_config(), logging_config=None)
    with caplog.at_level(logging.WARNING, logger="app.openapi"):
        on_startup(app)
    (record,) = [r for r in caplog.records if r.name == "app.openapi"]
    assert "colour, widget_ref" in record.getMessage()
    assert record.__dict__["parameters"] == ["colour", "widget_ref"]  # `limit` is explained in PARAMETERS
    assert "limit" in PARAMETERS
