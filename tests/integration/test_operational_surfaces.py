"""The service's own surfaces: /metrics only for its token, and an API page that works without internet."""

from __future__ import annotations

import re
from typing import Any

import httpx
import msgspec
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.conftest import refused, running
from tests.harness import free_port

METRICS_TOKEN = "scrape-3c1f0b7e9a2d4c68b5e1f0a7d9c3b2e1"


async def test_metrics_are_not_public_without_a_token_configured(client: AsyncTestClient[Any]) -> None:
    refused(await client.get("/metrics"), 404, "not_found")
    refused(await client.get("/metrics", headers={"Authorization": "Bearer anything"}), 404, "not_found")


async def test_metrics_answer_only_the_configured_token(test_settings: Settings) -> None:
    async with running(msgspec.structs.replace(test_settings, metrics_token=METRICS_TOKEN)) as client:
        await client.get("/health/live")
        refused(await client.get("/metrics"), 404, "not_found")
        for wrong in ("Bearer " + METRICS_TOKEN[:-1], "Basic " + METRICS_TOKEN, METRICS_TOKEN, "Bearer "):
            refused(await client.get("/metrics", headers={"Authorization": wrong}), 404, "not_found")
        refused(await client.get("/api/v1/me"), 401)  # refused by the authentication middleware
        answer = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert answer.status_code == 200, answer.text
        assert "clinic_requests_total" in answer.text
        # a refusal raised before the route answers is counted with its status, not as "0"
        assert 'clinic_requests_total{method="GET",path="/api/v1/me",status_code="401"}' in answer.text
        assert 'path="/api/v1/me",status_code="0"' not in answer.text


async def test_metrics_on_their_own_address_and_not_on_the_api_port(test_settings: Settings) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with running(msgspec.structs.replace(test_settings, metrics_address=address)) as client, \
            httpx.AsyncClient(base_url=f"http://{address}") as scraper:
        await client.get("/health/live")
        refused(await client.get("/metrics"), 404, "not_found")
        answer = await scraper.get("/metrics")
        assert answer.status_code == 200, answer.text
        assert "clinic_requests_total" in answer.text
        assert (await scraper.get("/health/live")).status_code == 404  # only the metrics live there
    async with running(msgspec.structs.replace(test_settings, metrics_address=address,
                                               metrics_token=METRICS_TOKEN)) as client, \
            httpx.AsyncClient(base_url=f"http://{address}") as scraper:
        assert (await scraper.get("/metrics")).status_code == 404  # a token set is asked for there too
        answer = await scraper.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert answer.status_code == 200, answer.text


def referenced(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


async def test_the_api_page_loads_only_assets_the_app_serves(client: AsyncTestClient[Any]) -> None:
    for page_path in ("/schema", "/schema/swagger"):
        page = await client.get(page_path)
        assert page.status_code == 200, page.text
        assert "SwaggerUIBundle" in page.text
        urls = referenced(page.text)
        assert len(urls) >= 3  # the script bundle, its preset, the styles
        for url in urls:
            assert url.startswith("/"), url
            assert not url.startswith("//"), url  # nothing from another host
            asset = await client.get(url)  # public, like the page: no token sent
            assert asset.status_code == 200, url
            assert len(asset.content) > 100, url
    assert "cdn." not in (await client.get("/schema")).text


async def test_every_parameter_has_a_description_and_an_example(client: AsyncTestClient[Any]) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    undocumented = []
    seen = 0
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                seen += 1
                if not parameter.get("description") or ("example" not in parameter and not parameter.get("examples")):
                    undocumented.append(f"{method.upper()} {path}: {parameter['in']} {parameter['name']}")
    assert seen > 20
    assert undocumented == []  # explain a new parameter in app/openapi.py PARAMETERS
    feed = schema["paths"]["/api/v1/slots/feed"]["get"]["parameters"]
    assert {p["name"]: p["example"] for p in feed}["from"] == "2026-12-01"
