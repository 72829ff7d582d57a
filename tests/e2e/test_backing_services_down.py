"""A backing service goes down under real server processes: PostgreSQL restarts, Redis restarts mid-chat, the
S3 endpoint disappears. Every request meanwhile is a 503 with Retry-After and the service's reason (never a
500), nothing is left half-written, and once the service is back the same processes serve again by themselves;
a chat across two instances loses and repeats nothing.

Each test runs its own PostgreSQL cluster or SeaweedFS (the suite's stay up for every other test); the real
profile only, as the embedded profile has neither."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import websockets

from app.migrate import upgrade
from app.settings import Settings
from tests.conftest import PROFILE, Session
from tests.e2e import test_gateway
from tests.e2e.conftest import log_path, servers
from tests.e2e.test_gateway import nothing_pending, ws_url
from tests.e2e.test_walkthrough import code_for
from tests.harness import free_port, pg_start, pg_stop, postgres, redis, seaweedfs

pytestmark = pytest.mark.skipif(PROFILE != "real", reason="PostgreSQL and SeaweedFS run in the real profile only")
WAIT = 60.0  # seconds a recovery may take on a busy machine before the test fails
open_chat = test_gateway.open_chat  # the gateway tests' fixture: a confirmed visit's chat


def phone() -> str:
    return f"+7916{secrets.randbelow(9_000_000) + 1_000_000}"


@pytest.fixture
def own_root() -> Iterator[Path]:
    """A directory for the test's own service, outside pytest's (PostgreSQL runs as its own user: it must reach
    its files, and pytest's temporary directories are the owner's alone)."""
    root = Path(tempfile.mkdtemp(prefix="clinic-down-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def signed_in(http: httpx.AsyncClient, settings: Settings) -> dict[str, str]:
    number = phone()
    assert (await http.post("/api/v1/auth/otp", json={"phone": number})).status_code == 202
    answer = await http.post("/api/v1/auth/token", json={"phone": number, "code": await code_for(settings, number)})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def unavailable(answer: httpx.Response, *reasons: str) -> None:
    assert answer.status_code == 503, f"{answer.request.method} {answer.request.url.path}: {answer.text}"
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.json()["extra"]["reason"] in reasons, answer.text


def no_defect_logged(settings: Settings, url: str) -> None:
    log = log_path(settings, url).read_text(errors="replace")
    assert "unhandled error" not in log, log[-4000:]


async def test_postgresql_restarting_is_503_with_retry_after_and_the_api_recovers_by_itself(
        test_settings: Settings, tmp_path: Path, own_root: Path) -> None:
    root = own_root
    with postgres(root) as server:
        url = f"{server}/postgres"
        await asyncio.to_thread(upgrade, url)
        settings = msgspec.structs.replace(test_settings, database_url=url, data_dir=str(tmp_path),
                                           sms_log_path=str(tmp_path / "sms.log"))
        async with servers(settings, 1) as (api,), httpx.AsyncClient(base_url=api, timeout=WAIT) as http:
            auth = await signed_in(http, settings)
            assert (await http.patch("/api/v1/me", headers=auth, json={"full_name": "Before"})).status_code == 200
            await asyncio.to_thread(pg_stop, root / "pg")  # every session ended, as a restart does
            for _ in range(2):  # the first try finds dead pooled connections, the next finds none to open
                for method, path, body in [
                    ("GET", "/api/v1/me", None),  # the read path
                    ("PATCH", "/api/v1/me", {"full_name": "During"}),  # a write through the session
                    ("GET", "/api/v1/consultations", None),  # the calendar's read
                    ("POST", "/api/v1/auth/otp", {"phone": phone()}),  # signing in
                ]:
                    unavailable(await http.request(method, path, headers=auth, json=body),
                                "database_unavailable", "unavailable")
            assert (await http.get("/health/ready")).status_code == 503
            await asyncio.to_thread(pg_start, root / "pg", int(server.rsplit(":", 1)[1]))
            deadline = time.monotonic() + WAIT
            while (answer := await http.get("/api/v1/me", headers=auth)).status_code != 200:
                unavailable(answer, "database_unavailable", "unavailable")
                assert time.monotonic() < deadline, "the API did not recover"
                await asyncio.sleep(0.2)
            assert answer.json()["full_name"] == "Before"  # the write during the outage never happened
            assert (await http.patch("/api/v1/me", headers=auth, json={"full_name": "After"})).status_code == 200
            assert (await http.get("/health/ready")).status_code == 200
            assert (await http.post("/api/v1/auth/otp", json={"phone": phone()})).status_code == 202
        no_defect_logged(settings, api)


async def test_the_s3_endpoint_down_is_503_and_leaves_no_document(test_settings: Settings, tmp_path: Path,
                                                                 own_root: Path) -> None:
    root = own_root
    with contextlib.ExitStack() as storage:
        endpoint = storage.enter_context(seaweedfs(root))
        settings = msgspec.structs.replace(test_settings, s3_endpoint_url=endpoint, s3_bucket="down-test",
                                           data_dir=str(tmp_path), sms_log_path=str(tmp_path / "sms.log"))
        async with servers(settings, 1) as (api,), \
                httpx.AsyncClient(base_url=api, timeout=WAIT) as http:
            auth = await signed_in(http, settings)
            me = (await http.get("/api/v1/me", headers=auth)).json()
            storage.close()  # the endpoint is gone
            listed = (await http.get("/api/v1/documents", headers=auth)).json()["items"]
            jpeg = b"\xff\xd8\xff\xe0" + os.urandom(64 * 1024)
            direct = await http.post("/api/v1/documents/upload", headers=auth, files={
                "file": ("scan.jpg", jpeg, "image/jpeg")}, data={"patient_id": me["id"], "kind": "image"})
            unavailable(direct, "storage_unavailable")
            created = await http.post("/api/v1/documents", headers=auth, json={
                "patient_id": me["id"], "kind": "image", "filename": "scan.jpg", "content_type": "image/jpeg",
                "size": len(jpeg)})
            if created.status_code == 201:  # presigning is the API's own work: completing needs the store
                completed = await http.post(f"/api/v1/documents/{created.json()['document']['id']}/complete",
                                            headers=auth)
                unavailable(completed, "storage_unavailable")
            else:
                unavailable(created, "storage_unavailable")
            assert (await http.get("/health/ready")).status_code == 503
            after = (await http.get("/api/v1/documents", headers=auth)).json()["items"]
            assert [d for d in after if d["status"] == "ready"] == [d for d in listed if d["status"] == "ready"]
        no_defect_logged(settings, api)


async def test_a_redis_restart_mid_chat_across_instances_loses_and_repeats_nothing(
        test_settings: Settings, own_root: Path, open_chat: dict[str, Any]) -> None:
    """The patient's socket on one instance, the doctor sending through the other; Redis (the bus between them,
    presence, limits) stops and starts again on the same port. Sends meanwhile are 503 and retried with the
    same client_id; the patient's app reconnects with `resume` whenever its socket closes. It ends with every
    message exactly once, in the order sent."""
    doctor: Session = open_chat["doctor"]
    patient: Session = open_chat["patient"]
    chat = f"/api/v1/chats/{open_chat['conversation_id']}/messages"
    port = free_port()
    bus = contextlib.ExitStack()
    settings = msgspec.structs.replace(test_settings, redis_url=bus.enter_context(redis(own_root, port)))
    texts = [f"message {i}" for i in range(15)]
    received: list[dict[str, Any]] = []
    refused_while_down = 0

    async def listen() -> None:
        """The patient's app: reads message.new, and after a close reconnects, resuming after the last event."""
        last: str | None = None
        while len(received) < len(texts):
            try:
                async with websockets.connect(ws_url(api[0], patient), open_timeout=WAIT) as socket:
                    if last is not None:
                        await socket.send(json.dumps({"type": "resume", "data": {"last_event_id": last}}))
                    while len(received) < len(texts):
                        frame = json.loads(await socket.recv())
                        if frame["type"] == "message.new":
                            received.append(frame)
                            last = frame["id"]
            except (OSError, websockets.ConnectionClosed, websockets.InvalidStatus):
                await asyncio.sleep(0.5)  # the app's reconnect delay

    async def send(http: httpx.AsyncClient, text: str) -> None:
        nonlocal refused_while_down
        body = {"client_id": uuid.uuid4().hex, "text": text}
        deadline = time.monotonic() + WAIT
        while (answer := await http.post(chat, headers=doctor.headers, json=body)).status_code != 201:
            unavailable(answer, "redis_unavailable", "unavailable", "chat_unavailable")
            refused_while_down += 1
            assert time.monotonic() < deadline, "sending did not recover"
            await asyncio.sleep(0.3)  # the app retries the same message (same client_id)

    async with servers(settings, 2) as api, httpx.AsyncClient(base_url=api[-1], timeout=WAIT) as http:
        async with websockets.connect(ws_url(api[0], patient)) as warm:
            await nothing_pending(warm)
        listening = asyncio.create_task(listen())
        try:
            for text in texts[:5]:
                await send(http, text)
            bus.close()  # Redis stops
            down = [asyncio.create_task(send(http, text)) for text in texts[5:10]]
            await asyncio.sleep(2)
            bus.enter_context(redis(own_root, port))  # and starts again, empty, on the same port
            for task in down:
                await task
            for text in texts[10:]:
                await send(http, text)
            async with asyncio.timeout(WAIT):
                await listening
        finally:
            listening.cancel()
            bus.close()
    ids = [int(f["id"]) for f in received]
    assert len(set(ids)) == len(ids), "an event came twice"
    assert ids == sorted(ids)
    assert sorted(f["data"]["text"] for f in received) == sorted(texts)  # none lost (the outage's in any order)
    assert [f["data"]["text"] for f in received][:5] == texts[:5]
    assert [f["data"]["text"] for f in received][10:] == texts[10:]
    print(f"sends refused while Redis was down: {refused_while_down}")
    for url in api:
        no_defect_logged(settings, url)
