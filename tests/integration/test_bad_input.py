"""Junk sent to every write route, signed in or not, never causes a 500; refusals share the one error shape."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from tests.conftest import Session

JUNK: list[Any] = [None, [], "text", 12, {"phone": None}, {"phone": 7}, {"phone": ["+79161234567"]},
                   {"phone": "+7" + "9" * 10_000}, {"full_name": "x" * 100_000}, {"birth_date": "31.12.1990"},
                   {"birth_date": "1990-02-30"}, {"code": {"$gt": ""}}, {"platform": "ios", "push_token": None},
                   {"refresh_token": ""}, {"role": "admin", "phone": "+79160000000", "full_name": "x"},
                   b'{"full_name": "\\ud800"}', b"\xff\xfe", b'{"phone": "+79161234567"', b"[" * 10_000,
                   {"questionnaire": []}, {"timezone": "../../etc/passwd"}, {"\u0000": 1}]
IDS = "00000000-0000-0000-0000-000000000000"


async def test_junk_bodies_never_cause_a_500(client: AsyncTestClient[Any], admin: Session) -> None:
    for route in client.app.routes:
        if not route.path.startswith("/api/"):
            continue
        path = re.sub(r"\{\w+:uuid\}", IDS, route.path)
        for method in route.methods & {"POST", "PATCH", "PUT", "DELETE"}:  # type: ignore[union-attr]
            for body in JUNK:
                for headers in (admin.headers, {}):
                    if isinstance(body, bytes):
                        answer = await client.request(method, path, content=body,
                                                      headers={**headers, "Content-Type": "application/json"})
                    else:
                        answer = await client.request(method, path, json=body, headers=headers)
                    assert answer.status_code < 500, (method, path, body, answer.text)
                    if answer.status_code >= 400:
                        assert set(answer.json()) == {"status_code", "detail", "extra"}


async def test_bad_path_ids_are_4xx(client: AsyncTestClient[Any], admin: Session) -> None:
    for path in ("/api/v1/patients/not-a-uuid", "/api/v1/patients/1", f"/api/v1/patients/{IDS}x"):
        answer = await client.get(path, headers=admin.headers)
        assert answer.status_code in (404, 422), path


# --- Readable refusals: every write route, enumerated from the OpenAPI document, as a role that may call it ---

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
ROLES = ("admin", "registrar", "doctor", "patient")
SIGNS_OUT = {"/api/v1/auth/logout"}
NOT_READABLE = re.compile(r"['\"]|Traceback|<class|\bat 0x|Error\(|\\n|\{'|^\W|Expected `")


def readable(body: dict[str, Any]) -> bool:
    """A sentence, not a repr: no quotes, no class names, no stack traces, and a snake_case reason."""
    detail = body["detail"]
    return (isinstance(detail, str) and 3 <= len(detail) <= 600 and not NOT_READABLE.search(detail)
            and bool(SNAKE.match(str(body["extra"].get("reason")))))


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def wrong_value(prop: dict[str, Any]) -> Any:
    """A value of a type the property does not take."""
    declared = [prop.get("type")] + [o.get("type") for o in prop.get("oneOf", []) + prop.get("anyOf", [])]
    types = {t for d in declared for t in (d if isinstance(d, list) else [d])}  # "type" may be a list in 3.1
    return {"nested": [1]} if "object" not in types else 12345


def write_bodies(schema: dict[str, Any], op: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what, request kwargs): no body, not JSON, the wrong JSON type, an unknown field, each field mistyped."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("empty", {}), ("not json", {"content": b"name=x&y", "headers": {"Content-Type": "application/json"}}),
        ("truncated", {"content": b'{"a": ', "headers": {"Content-Type": "application/json"}}),
        ("array", {"json": [1, 2]}), ("number", {"json": 7}), ("unknown field", {"json": {"no_such_field": 1}}),
    ]
    content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    body = resolve(schema, content.get("schema", {}))
    for option in [body, *(resolve(schema, o) for o in body.get("oneOf", []))]:
        for name, prop in option.get("properties", {}).items():
            cases.append((f"{name} mistyped", {"json": {name: wrong_value(resolve(schema, prop))}}))
            for edge in edges(resolve(schema, prop)):  # well typed, at the ends of what the type holds
                cases.append((f"{name} at {str(edge)[:20]}", {"json": {name: edge}}))
    return cases


def edges(prop: dict[str, Any]) -> list[Any]:
    formats = {prop.get("format")} | {o.get("format") for o in prop.get("oneOf", []) + prop.get("anyOf", [])}
    declared = [prop.get("type")] + [o.get("type") for o in prop.get("oneOf", []) + prop.get("anyOf", [])]
    types = {t for d in declared for t in (d if isinstance(d, list) else [d])}  # "type" may be a list in 3.1
    found: list[Any] = []
    if "date" in formats:
        found += ["0001-01-01", "9999-12-31"]
    if "date-time" in formats:
        found += ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-14:00",
                  "2026-06-01T10:00:00"]
    if "integer" in types or "number" in types:
        found += [-(2**63), 2**63, 0]
    if "string" in types and not formats - {None}:
        found += ["", "x" * 100_000]
    return found


async def test_every_write_route_explains_bad_bodies(client: AsyncTestClient[Any], admin: Session, patient: Session,
                                                    staff: Any, specialist: Any, login: Any, new_phone: Any) -> None:
    callers = {"admin": admin, "registrar": await staff("registrar"), "doctor": await specialist(),
               "patient": patient}
    schema = client.app.openapi_schema.to_schema()
    checked = required = 0
    for path, item in schema["paths"].items():
        if not path.startswith("/api/"):
            continue
        target = re.sub(r"\{\w+\}", IDS, path)
        for method, op in item.items():
            if method not in ("post", "put", "patch") or "requestBody" not in op:
                continue
            for role in ROLES:
                headers = callers[role].headers
                probe = await client.request(method.upper(), target, headers=headers)
                if probe.status_code in (401, 403):
                    continue  # not this role's route
                for what, kwargs in write_bodies(schema, op):
                    if path in SIGNS_OUT:  # a call may end the session: each on a session of its own
                        headers = (await login(new_phone())).headers
                    sent = {**kwargs, "headers": {**headers, **kwargs.get("headers", {})}}
                    answer = await client.request(method.upper(), target, **sent)
                    assert answer.status_code < 500, (method, path, role, what, answer.text)
                    if answer.status_code >= 400:
                        body = answer.json()
                        assert readable(body), (method, path, role, what, body)
                        checked += 1
                    if what == "empty" and answer.status_code == 422:  # a route whose body is optional takes none
                        assert answer.json()["extra"]["reason"] == "body_required", (method, path, answer.text)
                        required += 1
                    if what in ("not json", "truncated"):
                        assert answer.json()["extra"]["reason"] == "body_not_json", (method, path, answer.text)
                break  # one role that may call it is enough: bodies are parsed the same for all
    assert checked > 100
    assert required > 10  # most write routes need a body, and said so


async def test_validation_details_name_the_field(client: AsyncTestClient[Any], patient: Session) -> None:
    answer = await client.patch("/api/v1/me", headers=patient.headers, json={"full_name": 3})
    assert answer.status_code == 422
    assert answer.json()["detail"] == "invalid input: full_name: expected a string, got an integer"
    answer = await client.patch("/api/v1/me", headers=patient.headers, json={"nickname": "x"})
    assert answer.json()["detail"] == "invalid input: the body: object contains unknown field nickname"
    answer = await client.post("/api/v1/auth/otp")
    assert answer.json() == {"status_code": 422, "detail": "a JSON body is required",
                             "extra": {"reason": "body_required"}}
    answer = await client.get("/api/v1/staff", headers=patient.headers)
    assert answer.json()["extra"]["reason"] == "forbidden"
    answer = await client.get("/api/v1/no-such-route", headers=patient.headers)
    assert answer.json() == {"status_code": 404, "detail": "no such route", "extra": {"reason": "not_found"}}


async def test_domain_refusals_read_as_sentences(client: AsyncTestClient[Any], admin: Session) -> None:
    answer = await client.post("/api/v1/staff", headers=admin.headers, json={
        "phone": "+79160000001", "full_name": "Dr Who", "role": "doctor", "specialties": ["massage"]})
    assert answer.status_code == 422, answer.text
    assert readable(answer.json()), answer.text  # no list or enum repr of the specialties
    assert "endocrinology, " in answer.json()["detail"]


async def send_streamed(app: Any, headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, bytes, int]:
    """PATCH /api/v1/me straight through ASGI, the body in 1 MiB chunks: (status, body, chunks the app read)."""
    read, sent = 0, []
    piece = b'{"questionnaire": {"a": "' + b"x" * (1 << 20)

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": piece, "more_body": read < chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PATCH", "scheme": "http",
             "path": "/api/v1/me", "raw_path": b"/api/v1/me", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {}}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), read


async def test_a_large_body_is_refused_before_it_is_read(client: AsyncTestClient[Any], patient: Session) -> None:
    auth = (b"authorization", patient.headers["Authorization"].encode())
    # 50 MB sent chunked (no length given): the app stops reading at its limit
    status, body, read = await send_streamed(client.app, [auth], chunks=50)
    assert status == 413, body
    assert msgspec.json.decode(body)["extra"]["reason"] == "body_too_large"
    assert read <= 2  # 1 MiB chunks against a 1 MiB limit: never the whole 50
    # and a declared length past the limit is refused before a byte of it is read
    status, body, read = await send_streamed(client.app, [auth, (b"content-length", b"52428800")], chunks=50)
    assert status == 413, body
    assert msgspec.json.decode(body) == {"status_code": 413, "detail": "the request body is too large",
                                         "extra": {"reason": "body_too_large"}}
    assert read <= 1


async def test_a_nine_megabyte_questionnaire_is_not_stored(client: AsyncTestClient[Any], patient: Session) -> None:
    answer = await client.patch("/api/v1/me", headers=patient.headers,
                                json={"questionnaire": {"notes": "x" * 9_000_000}})
    assert answer.status_code == 413, answer.text
    answer = await client.patch("/api/v1/me", headers=patient.headers,
                                json={"questionnaire": {"notes": "x" * 100_000}})
    assert answer.status_code == 422, answer.text
    answer = await client.patch("/api/v1/me", headers=patient.headers,
                                json={"questionnaire": {f"q{i}": "x" * 1000 for i in range(100)}})
    assert answer.status_code == 422, answer.text
    assert "questionnaire" in answer.json()["detail"]
    me = (await client.get("/api/v1/me", headers=patient.headers)).json()
    assert me["questionnaire"] == {}


async def test_a_nul_in_free_text_is_422_and_nothing_is_written(
    client: AsyncTestClient[Any], patient: Session, specialist: Any, service: Any, visit_until: Any,
) -> None:
    """PostgreSQL cannot store NUL: a text holding one is refused up front (on SQLite too), never a 500 or a chat
    send group failed for everyone in it."""
    doctor = await specialist()
    visit = await visit_until(patient, doctor, await service(), "confirmed", nth=1)
    chat = f"/api/v1/chats/{visit['conversation_id']}/messages"
    sent = await client.post(chat, headers=patient.headers, json={"client_id": "nul-1", "text": "a\u0000b"})
    assert sent.status_code == 422, sent.text
    history = await client.get(chat, headers=patient.headers)
    assert all("\u0000" not in (m.get("text") or "") for m in history.json()["items"])
    for path, body in (("/api/v1/devices", {"platform": "ios", "push_token": "ab\u0000cd"}),
                       ("/api/v1/devices", {"platform": "android", "push_token": "x", "voip_token": "\u0000"}),
                       (f"/api/v1/consultations/{visit['id']}/cancel", {"reason": "\u0000"}),
                       ("/api/v1/waitlist", {"specialty": "endocrinology", "note": "late\u0000"})):
        answer = await client.post(path, headers=patient.headers, json=body)
        assert answer.status_code == 422, (path, answer.text)
    assert (await client.get(f"/api/v1/consultations/{visit['id']}", headers=patient.headers)).json()[
        "status"] == "confirmed"
