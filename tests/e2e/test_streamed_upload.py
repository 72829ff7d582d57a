"""A 100 MB direct upload through a real server process streams to storage: the server's memory stays flat."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import httpx
import pytest

from app.settings import Settings
from tests.conftest import Session
from tests.e2e.conftest import PIDS, servers
from tests.integration.test_document_uploads import stored_count

MiB = 1024 * 1024
FILE_BYTES = 100 * 1000 * 1000
BOUNDARY = "clinic-e2e-boundary-7f3a"


@pytest.fixture(scope="module")
async def one_api(test_settings: Settings) -> AsyncIterator[str]:
    """One server process of its own (DOCUMENT_MAX_BYTES at its default): starting one is quicker than the
    shared pair on a busy machine."""
    async with servers(test_settings, 1) as (url,):
        yield url


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Start VmHWM afresh from the current RSS (Linux: clear_refs 5); False where that is not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class BigPdf:
    """A PDF of `size` bytes made on the fly: one stream object of random data (1 MiB repeated)."""

    def __init__(self, size: int) -> None:
        block = os.urandom(MiB)
        while b"endstream" in block:
            block = os.urandom(MiB)
        self.block = block
        self.tail = b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
        head = b"%PDF-1.4\n1 0 obj\n<< /Length 0000000000 >>\nstream\n"
        self.data_bytes = size - len(head) - len(self.tail)
        self.head = head.replace(b"0000000000", b"%010d" % self.data_bytes)
        self.size = size

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.head
        left = self.data_bytes
        while left:
            piece = self.block[:min(left, MiB)]
            left -= len(piece)
            yield piece
        yield self.tail

    async def digest_of(self) -> str:
        digest = hashlib.sha256()
        async for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()


def form(patient_id: str, pdf: BigPdf) -> tuple[int, AsyncIterator[bytes]]:
    """The multipart body (fields, then the file), streamed, and its length."""
    fields = b"".join(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
        for name, value in (("patient_id", patient_id), ("kind", "analysis")))
    file_head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.pdf\"\r\n"
                 "Content-Type: application/pdf\r\n\r\n").encode()
    end = f"\r\n--{BOUNDARY}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield fields + file_head
        async for chunk in pdf.chunks():
            yield chunk
        yield end

    return len(fields) + len(file_head) + pdf.size + len(end), body()


async def test_a_100_mb_direct_upload_streams_with_flat_server_memory(
        test_settings: Settings, patient: Session) -> None:
    async with servers(test_settings, 1, DOCUMENT_MAX_BYTES=str(FILE_BYTES + MiB)) as (url,):
        pid = PIDS[url]
        pdf = BigPdf(FILE_BYTES)
        length, body = form(str(patient.id), pdf)
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            # warm the route once (imports, pools) so what is measured is the upload itself
            small_length, small_body = form(str(patient.id), BigPdf(1 * MiB))
            warm = await http.post("/api/v1/documents/upload", content=small_body, headers={
                **patient.headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(small_length)})
            assert warm.status_code == 201, warm.text
            before = memory_kib(pid)
            peak_reset = reset_peak(pid)
            answer = await http.post("/api/v1/documents/upload", content=body, headers={
                **patient.headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(length)})
            after = memory_kib(pid)
            assert answer.status_code == 201, answer.text
            document = answer.json()
            assert (document["status"], document["size"]) == ("ready", FILE_BYTES)
            baseline = before["VmRSS"] if peak_reset else max(before["VmRSS"], before["VmHWM"])
            growth_mib = (after["VmHWM"] - baseline) / 1024
            print(f"server peak RSS growth {growth_mib:.1f} MiB (peak reset: {peak_reset})")
            assert growth_mib < 40, f"server peak RSS grew {growth_mib:.1f} MiB for a {FILE_BYTES / MiB:.0f} MiB file"
            # and the bytes stored are the bytes sent
            moved = await http.get(f"/api/v1/documents/{document['id']}/download", headers=patient.headers)
            assert moved.status_code == 307
            digest = hashlib.sha256()
            async with httpx.AsyncClient(timeout=120) as plain, \
                    plain.stream("GET", moved.headers["location"]) as got:
                assert got.status_code == 200
                async for chunk in got.aiter_bytes():
                    digest.update(chunk)
            assert digest.hexdigest() == await pdf.digest_of()


async def test_a_large_body_on_another_route_is_refused_before_it_is_read(
        one_api: str, patient: Session) -> None:
    """50 MB announced to a JSON route: 413 after a first megabyte, the rest never sent."""
    host, port = one_api.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write((f"POST /api/v1/documents HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Authorization: Bearer {patient.access}\r\nContent-Length: {50 * 1000 * 1000}\r\n\r\n").encode())
        writer.write(b"{" + b" " * MiB)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        assert status_line.split()[1] == b"413", status_line
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_a_direct_upload_growing_past_the_limit_is_cut_and_aborted(
        one_api: str, patient: Session, test_settings: Settings) -> None:
    """Sent chunked (no Content-Length), so only the streaming cap stops it, after parts went out to storage."""
    before = stored_count(test_settings)
    boundary = "cut-boundary"

    async def body() -> AsyncIterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"patient_id\"\r\n\r\n{patient.id}\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\nimage\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n"
               "Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff\xe0"
        block = os.urandom(MiB)
        for _ in range(test_settings.document_max_bytes // MiB + 2):
            yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    async with httpx.AsyncClient(base_url=one_api, timeout=60) as http:
        try:
            answer = await http.post("/api/v1/documents/upload", content=body(), headers={
                **patient.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        except httpx.WriteError:  # the server answered and closed while the rest was still being sent
            answer = None
    if answer is not None:
        assert answer.status_code == 413, answer.text
        assert answer.json()["extra"]["reason"] == "too_large"
    assert stored_count(test_settings) == before
    if test_settings.s3_endpoint_url:  # no multipart upload left open
        s3 = boto3.client("s3", endpoint_url=test_settings.s3_endpoint_url,
                          aws_access_key_id=test_settings.s3_access_key,
                          aws_secret_access_key=test_settings.s3_secret_key, region_name=test_settings.s3_region)
        assert not s3.list_multipart_uploads(Bucket=test_settings.s3_bucket).get("Uploads")
