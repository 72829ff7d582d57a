"""Uploading documents: presigned PUT then complete, the direct streamed form, the checks on the bytes, downloads.

The real profile talks to SeaweedFS (its presigned URLs are checked by SeaweedFS itself), the embedded one to the
local-disk store whose signed URLs the app serves; the same tests run on both.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from uuid import UUID

import boto3
import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import Database
from app.documents.models import Document
from app.documents.storage import S3Store, object_store, upload_key
from app.documents.uploads import UploadService, expire_pending
from app.services import documents_for
from app.settings import Settings
from tests.conftest import Session, refused, running

# --- files made here, byte by byte ----------------------------------------------------------------------------


def pdf_bytes(extra_objects: bytes = b"", trailer: bytes = b"", stream_data: bytes | None = None) -> bytes:
    """A minimal valid one-page PDF (catalog, pages, page, content stream, xref, trailer)."""
    content = stream_data if stream_data is not None else b"BT /F1 12 Tf 20 100 Td (Hello) Tj ET"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"]
    out, offsets = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    out += extra_objects
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(offsets) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(offsets) + 1) + trailer + b">>\nstartxref\n%d\n%%%%EOF\n" % xref
    return out


def jpeg_bytes() -> bytes:
    """A 1x1 grey baseline JFIF: one DC-only block (Huffman tables of one code each)."""
    def segment(marker: int, body: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body

    app0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    dqt = segment(0xDB, b"\x00" + bytes([1] * 64))
    sof = segment(0xC0, b"\x08\x00\x01\x00\x01\x01\x01\x11\x00")
    dht_dc = segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    dht_ac = segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")
    sos = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    return b"\xff\xd8" + app0 + dqt + sof + dht_dc + dht_ac + sos + b"\x3f" + b"\xff\xd9"


def png_bytes() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def exe_bytes() -> bytes:
    """The start of a Windows PE executable: an MZ header pointing at a PE signature."""
    header = bytearray(512)
    header[:2] = b"MZ"
    header[0x3C:0x40] = struct.pack("<I", 0x80)
    header[0x80:0x84] = b"PE\x00\x00"
    return bytes(header)


JS_PDF = pdf_bytes(b"5 0 obj\n<< /Type /Action /S /JavaScript /JS (app.alert(1)) >>\nendobj\n")
ESCAPED_JS_PDF = pdf_bytes(b"5 0 obj\n<< /Type /Action /S /J#61vaScript /JS (app.alert(1)) >>\nendobj\n")
_PACKED = zlib.compress(b"6 0 << /Type /Action /S /JavaScript /JS (app.alert(1)) >>")
OBJSTM_JS_PDF = pdf_bytes(b"5 0 obj\n<< /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode /Length %d >>\nstream\n"
                          % len(_PACKED) + _PACKED + b"\nendstream\nendobj\n")
# the same object stream with its type or its filter given by reference, as readers resolve them
INDIRECT_TYPE_PDF = pdf_bytes(b"5 0 obj\n<< /Type 8 0 R /N 1 /First 4 /Filter /FlateDecode /Length %d >>\nstream\n"
                              % len(_PACKED) + _PACKED + b"\nendstream\nendobj\n8 0 obj\n/ObjStm\nendobj\n")
INDIRECT_FILTER_PDF = pdf_bytes(b"5 0 obj\n<< /Type /ObjStm /N 1 /First 4 /Filter 9 0 R /Length %d >>\nstream\n"
                                % len(_PACKED) + _PACKED + b"\nendstream\nendobj\n9 0 obj\n/FlateDecode\nendobj\n")
ENCRYPTED_PDF = pdf_bytes(b"5 0 obj\n<< /Filter /Standard /V 1 /R 2 /O (x) /U (y) /P -4 >>\nendobj\n",
                          b"/Encrypt 5 0 R ")


# --- talking to the API and to the store ----------------------------------------------------------------------


def http_for(client: AsyncTestClient[Any], url: str) -> Any:
    """The local store's URLs are the app's own (the test client); S3's are SeaweedFS's (a real HTTP client)."""
    return client if url.startswith(str(client.base_url)) else httpx.AsyncClient()


async def send(client: AsyncTestClient[Any], method: str, url: str, **kwargs: Any) -> httpx.Response:
    http = http_for(client, url)
    if http is client:
        return await client.request(method, url, **kwargs)
    async with http:
        answer: httpx.Response = await http.request(method, url, **kwargs)
        return answer


async def declare(client: AsyncTestClient[Any], who: Session, data: bytes | None = None, *,
                  content_type: str = "application/pdf", filename: str = "result.pdf", size: int | None = None,
                  patient_id: UUID | None = None, kind: str = "analysis") -> httpx.Response:
    answer: httpx.Response = await client.post("/api/v1/documents", headers=who.headers, json={
        "patient_id": str(patient_id or who.id), "kind": kind, "filename": filename, "content_type": content_type,
        "size": size if size is not None else len(data or b"")})
    return answer


async def put_bytes(client: AsyncTestClient[Any], created: dict[str, Any], data: bytes,
                    headers: dict[str, str] | None = None) -> httpx.Response:
    upload = created["upload"]
    assert upload["method"] == "PUT"
    return await send(client, "PUT", upload["url"], content=data, headers=headers or upload["headers"])


async def uploaded(client: AsyncTestClient[Any], who: Session, data: bytes, **declared: Any) -> dict[str, Any]:
    """Declared and PUT (not completed yet): the creation's answer."""
    answer = await declare(client, who, data, **declared)
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    put = await put_bytes(client, created, data)
    assert put.status_code == 200, put.text
    return created


async def complete(client: AsyncTestClient[Any], who: Session, created: dict[str, Any]) -> httpx.Response:
    answer: httpx.Response = await client.post(f"/api/v1/documents/{created['document']['id']}/complete",
                                               headers=who.headers)
    return answer


async def row(sessions: async_sessionmaker[AsyncSession], document_id: str) -> Document:
    async with sessions() as session:
        found = await session.scalar(select(Document).where(Document.id == UUID(document_id)))
        assert found is not None
        return found


def stored(settings: Settings, key: str) -> bool:
    """Whether the object exists, asked of the storage itself (boto3 against SeaweedFS, or the local dir)."""
    if settings.s3_endpoint_url:
        s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, aws_access_key_id=settings.s3_access_key,
                          aws_secret_access_key=settings.s3_secret_key, region_name=settings.s3_region)
        listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=key)
        return any(o["Key"] == key for o in listed.get("Contents", []))
    prefix, digest = key.split("/")
    return (Path(settings.data_dir) / "objects" / prefix / digest[:2] / digest).exists()


def stored_count(settings: Settings) -> int:
    if settings.s3_endpoint_url:
        s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, aws_access_key_id=settings.s3_access_key,
                          aws_secret_access_key=settings.s3_secret_key, region_name=settings.s3_region)
        return sum(len(p.get("Contents", [])) for p in
                   s3.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket))
    return sum(1 for p in (Path(settings.data_dir) / "objects").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
async def small_limit(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """The same clinic (database, bucket) with DOCUMENT_MAX_BYTES of 1000."""
    async with running(msgspec.structs.replace(test_settings, document_max_bytes=1000)) as c:
        yield c


@pytest.fixture(scope="module")
async def short_urls(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """The same clinic with download URLs living three seconds (one expired before its first use on a busy machine)."""
    async with running(msgspec.structs.replace(test_settings, document_url_seconds=3)) as c:
        yield c


# --- presigned upload ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "content_type", "filename"), [
    (pdf_bytes(), "application/pdf", "blood test.pdf"),
    (jpeg_bytes(), "image/jpeg", "photo.jpg"),
    (png_bytes(), "image/png", "scan.png"),
])
async def test_a_real_file_put_to_its_presigned_url_becomes_ready(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings, data: bytes, content_type: str,
        filename: str, session_maker: async_sessionmaker[AsyncSession]) -> None:
    created = await uploaded(client, patient, data, content_type=content_type, filename=filename)
    assert created["document"]["status"] == "pending"
    assert created["upload"]["headers"]["Content-Type"] == content_type
    if test_settings.s3_endpoint_url and test_settings.s3_sse:  # SSE is signed into the URL: the client sends it
        assert created["upload"]["headers"]["x-amz-server-side-encryption"] == "AES256"
    answer = await complete(client, patient, created)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["status"], body["size"], body["filename"], body["content_type"]) == (
        "ready", len(data), filename, content_type)
    assert body["inbox_status"] == "new"  # a patient's analysis enters the methodists' inbox
    again = await complete(client, patient, created)  # completing twice answers the same document
    assert again.status_code == 200
    assert again.json() == body
    document = await row(session_maker, body["id"])
    assert stored(test_settings, document.storage_key)
    if test_settings.s3_endpoint_url:  # written with server-side encryption
        s3 = boto3.client("s3", endpoint_url=test_settings.s3_endpoint_url,
                          aws_access_key_id=test_settings.s3_access_key,
                          aws_secret_access_key=test_settings.s3_secret_key, region_name=test_settings.s3_region)
        assert s3.head_object(Bucket=test_settings.s3_bucket, Key=document.storage_key)[
            "ServerSideEncryption"] == "AES256"


async def test_an_executable_named_pdf_is_refused_and_removed(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    created = await uploaded(client, patient, exe_bytes(), filename="report.pdf")
    key = (await row(session_maker, created["document"]["id"])).storage_key
    assert stored(test_settings, upload_key(key))
    refused(await complete(client, patient, created), 415, "type_mismatch")
    assert not stored(test_settings, key)  # the object is gone from the bucket
    assert not stored(test_settings, upload_key(key))
    document = await row(session_maker, created["document"]["id"])  # and the rejection was committed
    assert (document.status, document.reject_reason) == ("rejected", "type_mismatch")
    refused(await complete(client, patient, created), 415, "type_mismatch")  # again: the same answer


async def test_a_png_declared_as_jpeg_is_a_type_mismatch(client: AsyncTestClient[Any], patient: Session) -> None:
    created = await uploaded(client, patient, png_bytes(), content_type="image/jpeg", filename="x.jpg")
    refused(await complete(client, patient, created), 415, "type_mismatch")


async def test_a_type_outside_the_allowed_ones_is_refused_up_front(
        client: AsyncTestClient[Any], patient: Session) -> None:
    refused(await declare(client, patient, b"<html>", content_type="text/html", filename="x.html"), 415,
            "type_not_allowed")
    refused(await declare(client, patient, exe_bytes(), content_type="application/x-msdownload",
                          filename="x.exe"), 415, "type_not_allowed")


async def test_a_declared_size_over_the_limit_is_refused_up_front(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings) -> None:
    refused(await declare(client, patient, size=test_settings.document_max_bytes + 1), 413, "too_large")


async def test_a_real_size_over_the_limit_is_413(
        client: AsyncTestClient[Any], small_limit: AsyncTestClient[Any], patient: Session,
        test_settings: Settings, session_maker: async_sessionmaker[AsyncSession]) -> None:
    data = pdf_bytes(stream_data=b"0" * 3000)
    created = await uploaded(client, patient, data)  # declared under the limit of the day
    # and completed by an instance whose limit is 1000 bytes
    refused(await complete(small_limit, patient, created), 413, "too_large")
    document = await row(session_maker, created["document"]["id"])
    assert (document.status, document.reject_reason) == ("rejected", "too_large")
    assert not stored(test_settings, document.storage_key)


async def test_a_body_not_of_the_declared_size_is_refused(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    data = pdf_bytes()
    answer = await declare(client, patient, data, size=len(data) + 100)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    put = await put_bytes(client, created, data)  # the URL is signed for the declared length
    assert put.status_code == 403, put.text
    # an endpoint that let it through anyway: the complete compares the real size with the declared one
    key = (await row(session_maker, created["document"]["id"])).storage_key
    writer = await client.app.state.store.writer(upload_key(key), "application/pdf")
    await writer.write(data)
    await writer.finish()
    refused(await complete(client, patient, created), 413, "size_mismatch")
    assert not stored(test_settings, key)


@pytest.mark.parametrize(("data", "reason"), [
    (JS_PDF, "pdf_active_content"),
    (ESCAPED_JS_PDF, "pdf_active_content"),
    (OBJSTM_JS_PDF, "pdf_active_content"),
    (ENCRYPTED_PDF, "pdf_encrypted"),
    (INDIRECT_TYPE_PDF, "pdf_unscannable"),
    (INDIRECT_FILTER_PDF, "pdf_unscannable"),
], ids=["javascript", "escaped-name", "object-stream", "encrypted", "indirect-type", "indirect-filter"])
async def test_an_active_or_encrypted_pdf_is_refused(
        client: AsyncTestClient[Any], patient: Session, data: bytes, reason: str, test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    created = await uploaded(client, patient, data)
    refused(await complete(client, patient, created), 415, reason)
    document = await row(session_maker, created["document"]["id"])
    assert (document.status, document.reject_reason) == ("rejected", reason)
    assert not stored(test_settings, document.storage_key)


async def test_a_pdf_whose_object_stream_inflates_without_bound_is_refused(
        client: AsyncTestClient[Any], patient: Session) -> None:
    bomb = zlib.compress(b" " * (80 * 1024 * 1024), 9)  # 80 MiB inflated, past the 16 MiB checked
    data = pdf_bytes(b"5 0 obj\n<< /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode /Length %d >>\nstream\n"
                     % len(bomb) + bomb + b"\nendstream\nendobj\n")
    created = await uploaded(client, patient, data)
    refused(await complete(client, patient, created), 415, "pdf_unscannable")


async def test_a_put_with_another_content_type_is_refused_by_the_store(
        client: AsyncTestClient[Any], patient: Session) -> None:
    data = pdf_bytes()
    created = (await declare(client, patient, data)).json()
    put = await put_bytes(client, created, data, {**created["upload"]["headers"], "Content-Type": "text/html"})
    assert put.status_code == 403, put.text
    refused(await complete(client, patient, created), 409, "upload_missing")  # nothing arrived; still pending
    assert (await put_bytes(client, created, data)).status_code == 200  # the declared type goes through
    assert (await complete(client, patient, created)).json()["status"] == "ready"


async def test_a_tampered_upload_url_is_refused_by_the_store(client: AsyncTestClient[Any], patient: Session) -> None:
    data = pdf_bytes()
    created = (await declare(client, patient, data)).json()
    url = created["upload"]["url"]
    tampered = url.replace("uploads/", "uploads/0", 1) if "X-Amz" in url else url[:-1] + (
        "0" if url[-1] != "0" else "1")
    put = await send(client, "PUT", tampered, content=data, headers=created["upload"]["headers"])
    assert put.status_code == 403, put.text


async def test_someone_else_cannot_complete_an_upload(
        client: AsyncTestClient[Any], patient: Session, login: Callable[[str], Any],
        new_phone: Callable[[], str]) -> None:
    created = await uploaded(client, patient, pdf_bytes())
    stranger: Session = await login(new_phone())
    refused(await complete(client, stranger, created), 404)


async def test_uploading_for_a_stranger_is_404(
        client: AsyncTestClient[Any], patient: Session, login: Callable[[str], Any],
        new_phone: Callable[[], str]) -> None:
    other: Session = await login(new_phone())
    refused(await declare(client, patient, pdf_bytes(), patient_id=other.id), 404)


# --- download ---------------------------------------------------------------------------------------------------


async def test_a_download_is_a_short_lived_attachment_url(
        client: AsyncTestClient[Any], patient: Session) -> None:
    data = pdf_bytes()
    created = await uploaded(client, patient, data, filename="анализ крови \"1\".pdf")
    assert (await complete(client, patient, created)).status_code == 200
    answer = await client.get(f"/api/v1/documents/{created['document']['id']}/download", headers=patient.headers,
                              follow_redirects=False)
    assert answer.status_code == 307, answer.text
    got = await send(client, "GET", answer.headers["location"])
    assert got.status_code == 200, got.text
    assert got.content == data
    disposition = got.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    name = disposition.split("filename*=UTF-8''", 1)[1]
    assert unquote(name) == "анализ крови _1_.pdf"  # quotes never reach the header
    assert '"' not in disposition.split('filename="', 1)[1].rstrip('"').rsplit('"', 1)[0]
    tampered = answer.headers["location"].replace("sig=", "sig=0").replace("Signature=", "Signature=0")
    assert (await send(client, "GET", tampered)).status_code == 403


async def test_an_expired_download_url_is_refused(short_urls: AsyncTestClient[Any], patient: Session) -> None:
    data = pdf_bytes()
    created = await uploaded(short_urls, patient, data)
    assert (await complete(short_urls, patient, created)).status_code == 200
    answer = await short_urls.get(f"/api/v1/documents/{created['document']['id']}/download",
                                  headers=patient.headers, follow_redirects=False)
    location = answer.headers["location"]
    assert (await send(short_urls, "GET", location)).status_code == 200
    await asyncio.sleep(4.1)  # the URL's three seconds (and the clock's rounding) pass: time is what is tested
    assert (await send(short_urls, "GET", location)).status_code == 403


async def test_a_pending_document_has_no_download(client: AsyncTestClient[Any], patient: Session) -> None:
    created = (await declare(client, patient, pdf_bytes())).json()
    refused(await client.get(f"/api/v1/documents/{created['document']['id']}/download", headers=patient.headers),
            409, "not_ready")


async def test_a_stranger_gets_no_download(client: AsyncTestClient[Any], patient: Session,
                                           login: Callable[[str], Any], new_phone: Callable[[], str]) -> None:
    created = await uploaded(client, patient, pdf_bytes())
    assert (await complete(client, patient, created)).status_code == 200
    stranger: Session = await login(new_phone())
    refused(await client.get(f"/api/v1/documents/{created['document']['id']}/download", headers=stranger.headers),
            404)


# --- the URL after complete -------------------------------------------------------------------------------------


async def downloaded(client: AsyncTestClient[Any], who: Session, document_id: str) -> bytes:
    answer = await client.get(f"/api/v1/documents/{document_id}/download", headers=who.headers,
                              follow_redirects=False)
    assert answer.status_code == 307, answer.text
    got = await send(client, "GET", answer.headers["location"])
    assert got.status_code == 200, got.text
    return got.content


async def test_a_put_after_complete_does_not_change_what_is_served(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    data = pdf_bytes()
    created = await uploaded(client, patient, data)
    answer = await complete(client, patient, created)
    assert answer.status_code == 200, answer.text
    key = (await row(session_maker, created["document"]["id"])).storage_key
    # the ready document is served from a key its upload URL does not name, and nothing stays at the URL's
    assert key not in unquote(created["upload"]["url"])
    assert upload_key(key) in unquote(created["upload"]["url"])
    assert stored(test_settings, key)
    assert not stored(test_settings, upload_key(key))
    # the URL has not expired: unchecked bytes of the signed length go to it (the local store refuses them)
    hostile = exe_bytes()[:len(data)].ljust(len(data), b"\x00")
    put = await put_bytes(client, created, hostile)
    if test_settings.s3_endpoint_url:
        assert put.status_code == 200, put.text
    else:
        refused(put, 409, "already_uploaded")
    again = await complete(client, patient, created)  # completing again changes nothing either
    assert (again.status_code, again.json()["status"]) == (200, "ready")
    assert await downloaded(client, patient, created["document"]["id"]) == data


async def test_a_losing_rejection_keeps_the_ready_documents_object(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    """A complete that refused the bytes (on a stricter limit, say) after another one made the document ready:
    its rejection claims nothing, so the bytes the ready document serves stay."""
    data = pdf_bytes()
    created = await uploaded(client, patient, data)
    stale = await row(session_maker, created["document"]["id"])  # read while pending, as the loser did
    assert (await complete(client, patient, created)).status_code == 200
    database, store = Database(test_settings), object_store(test_settings)  # of this test's loop, as the loser's
    try:
        async with session_maker() as session:
            loser = UploadService(session, test_settings, store, database,
                                  documents_for(session, client.app.state))
            await loser._reject(stale, "too_large")
    finally:
        await database.dispose()
        await store.close()
    document = await row(session_maker, created["document"]["id"])
    assert (document.status, document.reject_reason) == ("ready", None)
    assert stored(test_settings, document.storage_key)
    assert await downloaded(client, patient, created["document"]["id"]) == data


async def test_a_complete_with_nothing_uploaded_is_409_and_after_ready_answers_the_document(
        client: AsyncTestClient[Any], patient: Session) -> None:
    answer = await declare(client, patient, pdf_bytes())
    created = answer.json()
    refused(await complete(client, patient, created), 409, "upload_missing")
    assert (await put_bytes(client, created, pdf_bytes())).status_code == 200
    first, second = await asyncio.gather(complete(client, patient, created), complete(client, patient, created))
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert first.json()["status"] == second.json()["status"] == "ready"


# --- uploads never completed ----------------------------------------------------------------------------------


async def test_pending_uploads_expire_with_their_objects(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    created = await uploaded(client, patient, pdf_bytes())
    key = (await row(session_maker, created["document"]["id"])).storage_key
    # two instances sweeping at once (each its own database pool and store): each row is claimed by one of them
    instances = [Database(test_settings), Database(test_settings)]
    try:
        swept = await asyncio.gather(*(expire_pending(db, object_store(test_settings), dt.timedelta(0))
                                       for db in instances))
    finally:
        for db in instances:
            await db.dispose()
    assert sum(swept) >= 1
    document = await row(session_maker, created["document"]["id"])
    assert (document.status, document.reject_reason) == ("rejected", "upload_expired")
    assert not stored(test_settings, key)
    assert not stored(test_settings, upload_key(key))
    refused(await complete(client, patient, created), 409, "upload_expired")


async def test_the_sweep_runs_in_the_background(
        test_settings: Settings, patient: Session, session_maker: async_sessionmaker[AsyncSession]) -> None:
    async with running(msgspec.structs.replace(test_settings, document_pending_seconds=1)) as quick:
        created = await uploaded(quick, patient, pdf_bytes())
        for _ in range(200):  # the sweep runs every half second; the upload expires after one
            if (await row(session_maker, created["document"]["id"])).status == "rejected":
                break
            await asyncio.sleep(0.05)
        document = await row(session_maker, created["document"]["id"])
        assert (document.status, document.reject_reason) == ("rejected", "upload_expired")
        assert not stored(test_settings, document.storage_key)


# --- direct upload ----------------------------------------------------------------------------------------------


def form(who: Session, data: bytes, content_type: str = "application/pdf", filename: str = "scan.pdf",
         **fields: str) -> dict[str, Any]:
    return {"data": {"patient_id": str(who.id), "kind": "analysis", **fields},
            "files": {"file": (filename, data, content_type)}}


async def test_a_direct_upload_is_stored_checked_and_ready(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    data = pdf_bytes()
    answer = await client.post("/api/v1/documents/upload", headers=patient.headers, **form(patient, data))
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert (body["status"], body["size"], body["filename"], body["content_type"]) == (
        "ready", len(data), "scan.pdf", "application/pdf")
    document = await row(session_maker, body["id"])
    assert stored(test_settings, document.storage_key)
    download = await client.get(f"/api/v1/documents/{body['id']}/download", headers=patient.headers,
                                follow_redirects=False)
    assert (await send(client, "GET", download.headers["location"])).content == data


async def test_a_direct_upload_larger_than_one_part_streams_in_parts(
        client: AsyncTestClient[Any], patient: Session) -> None:
    data = pdf_bytes(stream_data=os.urandom(11 * 1024 * 1024).replace(b"endstream", b"endstreaX"))
    answer = await client.post("/api/v1/documents/upload", headers=patient.headers, **form(patient, data))
    assert answer.status_code == 201, answer.text
    download = await client.get(f"/api/v1/documents/{answer.json()['id']}/download", headers=patient.headers,
                                follow_redirects=False)
    assert (await send(client, "GET", download.headers["location"])).content == data


@pytest.mark.parametrize(("data", "content_type", "status", "reason"), [
    (exe_bytes(), "application/pdf", 415, "type_mismatch"),
    (JS_PDF, "application/pdf", 415, "pdf_active_content"),
    (OBJSTM_JS_PDF, "application/pdf", 415, "pdf_active_content"),
    (ENCRYPTED_PDF, "application/pdf", 415, "pdf_encrypted"),
    (png_bytes(), "text/plain", 415, "type_not_allowed"),
], ids=["executable", "javascript", "object-stream", "encrypted", "not-allowed"])
async def test_a_refused_direct_upload_leaves_nothing(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings, data: bytes, content_type: str,
        status: int, reason: str) -> None:
    before = stored_count(test_settings)
    answer = await client.post("/api/v1/documents/upload", headers=patient.headers,
                               **form(patient, data, content_type))
    refused(answer, status, reason)
    assert stored_count(test_settings) == before


async def test_a_direct_upload_over_the_limit_is_413(
        small_limit: AsyncTestClient[Any], patient: Session, test_settings: Settings) -> None:
    before = stored_count(test_settings)
    answer = await small_limit.post("/api/v1/documents/upload", headers=patient.headers,
                                    **form(patient, pdf_bytes(stream_data=b"0" * 5000)))
    refused(answer, 413)
    assert stored_count(test_settings) == before


async def test_a_direct_upload_whose_declared_size_lies_is_413(
        client: AsyncTestClient[Any], patient: Session) -> None:
    data = pdf_bytes()
    answer = await client.post("/api/v1/documents/upload", headers=patient.headers,
                               **form(patient, data, size=str(len(data) - 1)))
    refused(answer, 413, "size_mismatch")


async def test_a_direct_upload_needs_its_fields_and_a_file(client: AsyncTestClient[Any], patient: Session) -> None:
    refused(await client.post("/api/v1/documents/upload", headers=patient.headers,
                              data={"patient_id": str(patient.id), "kind": "analysis"}), 422)
    refused(await client.post("/api/v1/documents/upload", headers=patient.headers,
                              files={"file": ("a.pdf", pdf_bytes(), "application/pdf")}), 422, "invalid_input")
    refused(await client.post("/api/v1/documents/upload", headers=patient.headers, json={"x": 1}), 422,
            "multipart_required")


async def test_a_large_body_elsewhere_is_refused_by_the_app_wide_limit(
        client: AsyncTestClient[Any], patient: Session, test_settings: Settings) -> None:
    big = b"{" + b" " * (test_settings.max_body_bytes + 10) + b"}"
    answer = await client.post("/api/v1/documents", headers={**patient.headers, "Content-Type": "application/json"},
                               content=big)
    refused(answer, 413)


async def test_the_profile_store_is_the_one_expected(client: AsyncTestClient[Any], test_settings: Settings) -> None:
    assert isinstance(client.app.state.store, S3Store) == bool(test_settings.s3_endpoint_url)

