"""The HTTP SMS backend against a local gateway that speaks HTTP: template, credentials, retries, failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest

from app.settings import Settings
from tests.conftest import running


class Gateway:
    """Answers 503 to the first `failures` posts, then 200; records what arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], Any]] = []
        self.failures = 0
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gateway.received.append((dict(self.headers), body))
                status = 503 if gateway.failures > 0 else 200
                gateway.failures -= 1
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/send"


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    thread = threading.Thread(target=gw.server.serve_forever, daemon=True)
    thread.start()
    yield gw
    gw.server.shutdown()
    gw.server.server_close()


def http_settings(settings: Settings, url: str) -> Settings:
    return msgspec.structs.replace(
        settings, sms_backend="http", sms_http_url=url, sms_http_token="gw-token", sms_http_retries=3,
        sms_http_template='{"messages": [{"phone": "{to}", "body": "{text}", "sender": "Clinic"}]}')


async def test_code_goes_to_the_gateway_with_template_and_credentials(
    gateway: Gateway, test_settings: Settings, new_phone: Callable[[], str]
) -> None:
    phone = new_phone()
    async with running(http_settings(test_settings, gateway.url)) as client:
        answer = await client.post("/api/v1/auth/otp", json={"phone": phone})
        assert answer.status_code == 202
        headers, body = gateway.received[-1]
        assert headers["Authorization"] == "Bearer gw-token"
        message = body["messages"][0]
        assert (message["phone"], message["sender"]) == (phone, "Clinic")
        code = message["body"].split("code: ")[1][:6]
        assert (await client.post("/api/v1/auth/token", json={"phone": phone, "code": code})).status_code == 200


async def test_gateway_errors_are_retried(gateway: Gateway, test_settings: Settings,
                                          new_phone: Callable[[], str]) -> None:
    gateway.failures = 2
    async with running(http_settings(test_settings, gateway.url)) as client:
        assert (await client.post("/api/v1/auth/otp", json={"phone": new_phone()})).status_code == 202
    assert len(gateway.received) == 3


async def test_a_gateway_that_stays_down_is_a_clear_503(gateway: Gateway, test_settings: Settings,
                                                        new_phone: Callable[[], str]) -> None:
    gateway.failures = 10
    async with running(http_settings(test_settings, gateway.url)) as client:
        answer = await client.post("/api/v1/auth/otp", json={"phone": new_phone()})
    assert answer.status_code == 503
    assert answer.json()["extra"]["reason"] == "sms_unavailable"
    assert len(gateway.received) == 3
