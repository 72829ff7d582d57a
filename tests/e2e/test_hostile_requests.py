"""Requests an attacker shapes to hold a real server process: headers without end, bodies that stall or trickle.
Each is refused with the API's error body, and the server keeps answering everyone else meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import httpx
import pytest

from app.http_head import MAX_HEAD_BYTES
from app.settings import Settings
from tests.conftest import Session
from tests.e2e.conftest import PIDS, servers
from tests.integration.test_document_uploads import stored_count

IDLE, WHOLE = 3.0, 6.0  # this server's BODY_IDLE_SECONDS and BODY_SECONDS
WAIT = 30.0  # seconds an answer may take on a busy machine before the test fails


@pytest.fixture(scope="module")
async def api(test_settings: Settings) -> AsyncIterator[str]:
    async with servers(test_settings, 1, BODY_IDLE_SECONDS=str(IDLE), BODY_SECONDS=str(WHOLE)) as (url,):
        yield url


@contextlib.asynccontextmanager
async def raw(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], dict[str, object]]:
    """Status, headers and JSON body of the one answer on this connection."""
    async with asyncio.timeout(WAIT):
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, json.loads(body)


def head(path: str, length: int, *more: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: clinic", "Content-Type: application/json",
                         f"Content-Length: {length}", *more]) + "\r\n\r\n").encode()


def rss_kib(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1])


async def test_headers_without_end_are_refused_431_and_held_no_further(api: str) -> None:
    before = rss_kib(PIDS[api])
    async with raw(api) as (reader, writer):
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: clinic\r\n")
        with contextlib.suppress(ConnectionError):  # the server may close while the rest is still being sent
            for n in range(200):  # 50 MB of headers, if the server took them
                writer.write(f"X-Padding-{n}: ".encode() + b"a" * 256 * 1024 + b"\r\n")
                await writer.drain()
                if reader._buffer:  # type: ignore[attr-defined]  # the server answered: stop sending
                    break
        status, headers, body = await answer_of(reader)
        assert status == 431
        assert body["extra"] == {"reason": "headers_too_large"}
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # and the server's side is closed
    assert rss_kib(PIDS[api]) - before < 16 * 1024  # nowhere near the 50 MB offered
    async with httpx.AsyncClient(base_url=api) as http:  # a large but sane head is still served
        answer = await http.get("/health/live", headers={"X-Padding": "a" * (MAX_HEAD_BYTES // 2)})
        assert answer.status_code == 200


async def test_a_body_that_stops_arriving_is_refused_408_after_the_gap(api: str) -> None:
    async with raw(api) as (reader, writer):
        writer.write(head("/api/v1/auth/otp", 200) + b'{"phone": "+7916')
        await writer.drain()
        started = time.monotonic()
        status, headers, body = await answer_of(reader)
        assert status == 408
        assert time.monotonic() - started >= IDLE * 0.9
        assert body["extra"] == {"reason": "body_timeout"}
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), WAIT) == b""


async def test_a_body_trickled_a_byte_at_a_time_is_cut_at_the_whole_body_bound(api: str) -> None:
    async with raw(api) as (reader, writer):
        writer.write(head("/api/v1/auth/otp", 1000))
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1000):  # never a gap as long as IDLE: only the whole-body bound stops it
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(IDLE / 4)

        sending = asyncio.create_task(trickle())
        try:
            status, _, body = await answer_of(reader)
        finally:
            sending.cancel()
        assert status == 408
        assert time.monotonic() - started >= WHOLE * 0.9
        assert body["extra"] == {"reason": "body_timeout"}


async def test_stalled_bodies_hold_nothing_others_need(api: str, patient: Session) -> None:
    """More stalled writes than the server has database connections, signed in and not: meanwhile a patient's
    own write and the readiness check (which asks the database) are answered, before any stalled one is."""
    async with contextlib.AsyncExitStack() as stack:
        stalled = []
        for n in range(60):
            reader, writer = await stack.enter_async_context(raw(api))
            path, auth = (("/api/v1/documents", [f"Authorization: Bearer {patient.access}"]) if n % 2
                          else ("/api/v1/auth/otp", []))
            writer.write(head(path, 500, *auth) + b'{"kind": "analysis", ')
            await writer.drain()
            stalled.append(reader)

        async def answered(reader: asyncio.StreamReader) -> tuple[int, float]:
            status, _, _ = await answer_of(reader)
            return status, time.monotonic()

        waiting = [asyncio.create_task(answered(r)) for r in stalled]
        async with httpx.AsyncClient(base_url=api, timeout=WAIT) as http:
            ready = await http.get("/health/ready")
            created = await http.post("/api/v1/documents", headers=patient.headers, json={
                "patient_id": str(patient.id), "kind": "analysis", "filename": "a.pdf",
                "content_type": "application/pdf", "size": 1000})
        served = time.monotonic()
        assert ready.status_code == 200, ready.text
        assert created.status_code == 201, created.text
        answers = await asyncio.gather(*waiting)
        assert {status for status, _ in answers} == {408}
        assert min(at for _, at in answers) > served  # no stalled request was in their way


async def test_a_direct_upload_that_stalls_is_408_and_leaves_no_document_or_object(
        api: str, patient: Session, test_settings: Settings) -> None:
    boundary = "stall-boundary"
    fields = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"patient_id\"\r\n\r\n{patient.id}\r\n"
              f"--{boundary}\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\nimage\r\n"
              f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"scan.jpg\"\r\n"
              "Content-Type: image/jpeg\r\n\r\n").encode()
    async with httpx.AsyncClient(base_url=api, timeout=WAIT) as http:
        listed = (await http.get("/api/v1/documents", headers=patient.headers,
                                 params={"patient_id": str(patient.id)})).json()["items"]
    objects = stored_count(test_settings)
    size = 20 * 1024 * 1024
    async with raw(api) as (reader, writer):
        writer.write(("\r\n".join([
            "POST /api/v1/documents/upload HTTP/1.1", "Host: clinic", f"Authorization: Bearer {patient.access}",
            f"Content-Type: multipart/form-data; boundary={boundary}", f"Content-Length: {len(fields) + size + 64}",
        ]) + "\r\n\r\n").encode())
        writer.write(fields + b"\xff\xd8\xff\xe0" + os.urandom(9 * 1024 * 1024))  # past one part, then silence
        await writer.drain()
        status, _, body = await answer_of(reader)
    assert status == 408
    assert body["extra"] == {"reason": "body_timeout"}
    async with httpx.AsyncClient(base_url=api, timeout=WAIT) as http:
        after = (await http.get("/api/v1/documents", headers=patient.headers,
                                params={"patient_id": str(patient.id)})).json()["items"]
    assert after == listed  # no document, pending or ready
    assert stored_count(test_settings) == objects  # no object
    if test_settings.s3_endpoint_url:  # and no multipart upload left open
        s3 = boto3.client("s3", endpoint_url=test_settings.s3_endpoint_url,
                          aws_access_key_id=test_settings.s3_access_key,
                          aws_secret_access_key=test_settings.s3_secret_key, region_name=test_settings.s3_region)
        assert not s3.list_multipart_uploads(Bucket=test_settings.s3_bucket).get("Uploads")


async def test_a_file_sent_slowly_but_steadily_is_taken_past_the_whole_body_bound(
        api: str, patient: Session) -> None:
    """A phone on a slow line: a chunked direct upload that takes longer than BODY_SECONDS, never pausing as long
    as BODY_IDLE_SECONDS, is stored (only JSON bodies have the whole-body bound)."""
    boundary = "steady-boundary"

    async def body() -> AsyncIterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"patient_id\"\r\n\r\n{patient.id}\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\nimage\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.jpg\"\r\n"
               "Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff\xe0"
        ends = time.monotonic() + WHOLE * 1.5
        while time.monotonic() < ends:
            yield os.urandom(64 * 1024)
            await asyncio.sleep(IDLE / 3)
        yield f"\r\n--{boundary}--\r\n".encode()

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=api, timeout=WAIT) as http:
        answer = await http.post("/api/v1/documents/upload", content=body(), headers={
            **patient.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert time.monotonic() - started > WHOLE
    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "ready"
