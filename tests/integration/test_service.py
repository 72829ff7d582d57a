"""Service endpoints: health, readiness, metrics, the OpenAPI schema, request ids and the error body."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.conftest import PROFILE, running


async def test_live_and_ready_check_every_backing_service(client: AsyncTestClient[Any]) -> None:
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"database", "redis", "storage"}
    assert all(v.startswith("ok") for v in checks.values())
    assert (checks["redis"] == "ok") == (PROFILE == "real")


async def test_ready_names_the_failed_dependency(test_settings: Settings) -> None:
    broken = test_settings.__class__(**{
        **{f: getattr(test_settings, f) for f in test_settings.__struct_fields__},
        "s3_endpoint_url": "http://127.0.0.1:9",  # nothing listens on the discard port
        "redis_url": "redis://127.0.0.1:9/0" if PROFILE == "real" else None,
        "redis_timeout_seconds": 0.5,  # start-up waits for Redis a while before it serves without it
    })
    async with running(broken) as client:
        ready = await client.get("/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status_code"] == 503
    assert "storage" in body["extra"]["failed"]
    assert ("redis" in body["extra"]["failed"]) == (PROFILE == "real")
    assert "database" not in body["extra"]["failed"]


async def test_metrics_count_requests_by_route_template(test_settings: Settings) -> None:
    async with running(msgspec.structs.replace(test_settings, metrics_token="t" * 32)) as client:
        await client.get("/health/live")
        await client.get(f"/api/v1/patients/{'0' * 8}-0000-0000-0000-000000000000")
        text = (await client.get("/metrics", headers={"Authorization": "Bearer " + "t" * 32})).text
    assert "clinic_requests_total" in text
    assert "clinic_request_duration_seconds_bucket" in text
    assert 'path="/api/v1/patients/{patient_id}"' in text  # grouped, not one series per id


async def test_schema_is_openapi_31_with_an_interactive_page(client: AsyncTestClient[Any]) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    assert schema["openapi"].startswith("3.1")
    assert "/api/v1/auth/otp" in schema["paths"]
    page = await client.get("/schema")
    assert page.status_code == 200
    assert "<html" in page.text.lower()


async def test_every_answer_carries_a_request_id(client: AsyncTestClient[Any]) -> None:
    mine = await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    generated = await client.get("/health/live", headers={"X-Request-ID": "bad id\n<script>"})
    assert generated.headers["x-request-id"] != "bad id\n<script>"
    assert len(generated.headers["x-request-id"]) == 32


async def test_errors_share_one_machine_readable_body(client: AsyncTestClient[Any]) -> None:
    missing = await client.get("/no/such/route")
    assert missing.status_code == 404
    assert set(missing.json()) == {"status_code", "detail", "extra"}
    unauth = await client.get("/api/v1/me")
    assert unauth.status_code == 401
    assert unauth.json()["extra"]["reason"] == "token_missing"
    garbage = await client.post("/api/v1/auth/otp", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status_code in (400, 422)
    assert set(garbage.json()) == {"status_code", "detail", "extra"}
    unknown_field = await client.post("/api/v1/auth/otp", json={"phone": "+79161234567", "admin": True})
    assert unknown_field.status_code == 422
    assert unknown_field.json()["extra"]["reason"] == "invalid_input"
