"""Junk sent to every write route, signed in or not, never causes a 500; refusals share the one error shape."""

from __future__ import annotations

import re
from typing import Any

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
