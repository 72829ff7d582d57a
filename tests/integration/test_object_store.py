"""The object store seam: the profile's store (SeaweedFS in the real profile, local disk in the embedded one), and
the local-disk store with the signed URLs the app serves (run in both profiles)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from app.documents.storage import LocalDiskStore, ObjectStore, S3Store, content_disposition, new_key, object_store
from app.errors import Forbidden
from app.settings import Settings
from tests.conftest import refused, running

MiB = 1024 * 1024


@pytest.fixture
async def store(test_settings: Settings) -> AsyncIterator[ObjectStore]:
    made = object_store(test_settings)
    await made.start()
    yield made
    await made.close()


@pytest.fixture(scope="module")
async def local(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """An instance on the local-disk store whatever the profile (its objects under data_dir/objects)."""
    async with running(msgspec.structs.replace(test_settings, s3_endpoint_url=None)) as c:
        assert isinstance(c.app.state.store, LocalDiskStore)
        yield c


def pending_multipart_uploads(settings: Settings, key: str) -> int:
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, aws_access_key_id=settings.s3_access_key,
                      aws_secret_access_key=settings.s3_secret_key, region_name=settings.s3_region)
    return len(s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=key).get("Uploads", []))


async def test_a_streamed_put_reads_back_whole_ranged_and_streamed(store: ObjectStore) -> None:
    chunks = [os.urandom(3 * MiB) for _ in range(4)]  # 12 MiB: more than one part of the S3 store
    key = new_key()
    writer = await store.writer(key, "application/pdf")
    for chunk in chunks:
        await writer.write(chunk)
    await writer.finish()
    data = b"".join(chunks)
    assert await store.head(key) == len(data)
    assert await store.read_range(key, 0, 8) == data[:8]
    assert await store.read_range(key, len(data) - 4, 100) == data[-4:]  # fewer at the end
    digest = hashlib.sha256()
    async for piece in store.stream(key, 1 * MiB):
        assert len(piece) <= 1 * MiB
        digest.update(piece)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    await store.delete(key)
    assert await store.head(key) is None
    await store.delete(key)  # already gone: no error


async def test_an_aborted_put_leaves_nothing(store: ObjectStore, test_settings: Settings) -> None:
    key = new_key()
    writer = await store.writer(key, "application/pdf")
    for _ in range(3):
        await writer.write(os.urandom(4 * MiB))  # the S3 store has sent a part by now
    await writer.abort()
    assert await store.head(key) is None
    if isinstance(store, S3Store):
        assert pending_multipart_uploads(test_settings, key) == 0


async def test_a_small_put_is_one_object(store: ObjectStore) -> None:
    key = new_key()
    writer = await store.writer(key, "image/png")
    await writer.write(b"\x89PNG\r\n\x1a\n")
    await writer.finish()
    assert await store.head(key) == 8
    assert await store.read_range(key, 0, 64) == b"\x89PNG\r\n\x1a\n"


async def test_a_move_never_replaces_an_object(store: ObjectStore) -> None:
    src, dst, other = new_key("uploads"), new_key(), new_key()
    for key, data in ((src, b"first"), (other, b"taken")):
        writer = await store.writer(key, "application/pdf")
        await writer.write(data)
        await writer.finish()
    assert await store.move(src, dst)
    assert await store.head(src) is None
    assert await store.read_range(dst, 0, 64) == b"first"
    assert not await store.move(src, dst)  # nothing left at src
    writer = await store.writer(src, "application/pdf")
    await writer.write(b"second")
    await writer.finish()
    assert not await store.move(src, dst)  # dst holds an object: it stays as it was
    assert await store.read_range(dst, 0, 64) == b"first"
    assert not await store.move(src, other)
    assert await store.read_range(other, 0, 64) == b"taken"


async def test_the_bucket_is_made_when_missing(test_settings: Settings) -> None:
    fresh = object_store(msgspec.structs.replace(test_settings, s3_bucket=f"{test_settings.s3_bucket}-new",
                                                 data_dir=str(Path(test_settings.data_dir) / "fresh")))
    await fresh.start()
    await fresh.start()  # twice (or by two instances): no error
    await fresh.check()
    await fresh.close()


def test_content_disposition_is_a_safe_attachment() -> None:
    assert content_disposition("анализ.pdf") == (
        "attachment; filename=\"______.pdf\"; filename*=UTF-8''%D0%B0%D0%BD%D0%B0%D0%BB%D0%B8%D0%B7.pdf")
    for hostile in ("../../etc/passwd", 'a"b.pdf', "a\r\nSet-Cookie: x=1.pdf", "C:\\win\\evil.pdf", ".hidden"):
        header = content_disposition(hostile)
        assert "\r" not in header
        assert "\n" not in header
        assert "/" not in header.split("''")[0]
        assert header.count('"') == 2
    assert "filename=\"passwd\"" in content_disposition("../../etc/passwd")


# --- the local store's signed URLs, served by the app -----------------------------------------------------------


async def test_local_keys_cannot_leave_the_objects_directory(local: AsyncTestClient[Any]) -> None:
    store: LocalDiskStore = local.app.state.store
    for key in ("../secrets.json", "documents/../../secrets.json", "/etc/passwd", "documents/ABC",
                "documents/" + "0" * 31 + "/", "report.pdf", "documents/" + "g" * 32):
        with pytest.raises(Forbidden):
            store.path(key)
    assert store.path(new_key()).is_relative_to(store.root)
    for path in ("/api/v1/objects/../secrets.json", "/api/v1/objects/documents/..%2F..%2Fsecrets.json",
                 "/api/v1/objects/%2e%2e/%2e%2e/secrets.json"):
        answer = await local.get(path, params={"expires": str(int(time.time()) + 60), "sig": "0" * 64})
        assert answer.status_code in (403, 404), answer.text
        assert b"jwt_keys" not in answer.content


async def test_a_local_upload_url_is_bound_to_type_length_and_signature(local: AsyncTestClient[Any]) -> None:
    store: LocalDiskStore = local.app.state.store
    key = new_key()
    url, headers = await store.presign_put(key, "application/pdf", 10, str(local.base_url).rstrip("/"))
    assert headers == {"Content-Type": "application/pdf"}
    refused(await local.put(url, content=b"0123456789", headers={"Content-Type": "image/png"}), 403,
            "bad_signature")
    refused(await local.put(url, content=b"0123456789AB", headers=headers), 403, "bad_signature")
    refused(await local.put(url.replace("sig=", "sig=f"), content=b"0123456789", headers=headers), 403,
            "bad_signature")
    refused(await local.put(url.replace("sig=", "sig=%C3%A9"), content=b"0123456789", headers=headers), 403,
            "bad_signature")  # not even ASCII
    other = new_key()
    refused(await local.put(url.replace(key, other), content=b"0123456789", headers=headers), 403, "bad_signature")
    assert await store.head(key) is None
    assert (await local.put(url, content=b"0123456789", headers=headers)).status_code == 200
    assert await store.head(key) == 10
    # a URL writes once
    refused(await local.put(url, content=b"ABCDEFGHIJ", headers=headers), 409, "already_uploaded")
    assert await store.read_range(key, 0, 64) == b"0123456789"


async def test_an_expired_local_url_is_refused(local: AsyncTestClient[Any], test_settings: Settings) -> None:
    store: LocalDiskStore = local.app.state.store
    # the same secret, URLs that expired ten seconds ago
    past = LocalDiskStore(store.root, test_settings.secret_key, url_seconds=-10, upload_url_seconds=-10)
    key = new_key()
    url, headers = await past.presign_put(key, "application/pdf", 4, str(local.base_url).rstrip("/"))
    refused(await local.put(url, content=b"%PDF", headers=headers), 403, "url_expired")
    url, headers = await store.presign_put(key, "application/pdf", 4, str(local.base_url).rstrip("/"))
    assert (await local.put(url, content=b"%PDF", headers=headers)).status_code == 200
    expired = await past.presign_get(key, "a.pdf", "application/pdf", str(local.base_url).rstrip("/"))
    refused(await local.get(expired), 403, "url_expired")
    fine = await store.presign_get(key, "a.pdf", "application/pdf", str(local.base_url).rstrip("/"))
    answer = await local.get(fine)
    assert answer.status_code == 200
    assert answer.content == b"%PDF"
    assert answer.headers["content-disposition"].startswith("attachment;")
    refused(await local.get(fine.replace("name=a.pdf", "name=b.pdf")), 403, "bad_signature")


async def test_object_urls_are_not_served_on_the_s3_profile(client: AsyncTestClient[Any],
                                                            test_settings: Settings) -> None:
    answer = await client.get(f"/api/v1/objects/{new_key()}", params={"expires": "1", "sig": "0"})
    if test_settings.s3_endpoint_url:
        refused(answer, 404)
    else:
        refused(answer, 403, "bad_signature")


async def test_a_presigned_s3_url_is_checked_by_the_endpoint(store: ObjectStore) -> None:
    """SeaweedFS checks presigned signatures itself (the local store: the tests above)."""
    key = new_key()
    url, headers = await store.presign_put(key, "image/jpeg", 3, "http://testserver.local")
    if not isinstance(store, S3Store):
        assert url.startswith("http://testserver.local/api/v1/objects/")
        return
    async with httpx.AsyncClient() as http:
        assert (await http.put(url, content=b"abc", headers={"Content-Type": "image/jpeg"})).status_code == 403
        assert (await http.put(url, content=b"abc", headers=headers)).status_code == 200
        got = await http.get(await store.presign_get(key, "a.jpg", "image/jpeg", ""))
        assert (got.status_code, got.content) == (200, b"abc")


async def test_presigned_urls_name_the_public_endpoint_when_one_is_set(test_settings: Settings) -> None:
    """Clients may reach S3 under another name than the app: URLs are signed for that name and work there."""
    if not test_settings.s3_endpoint_url:
        assert isinstance(object_store(test_settings), LocalDiskStore)  # the local store's URLs are the app's
        return
    public = test_settings.s3_endpoint_url.replace("127.0.0.1", "localhost")
    store = object_store(msgspec.structs.replace(test_settings, s3_public_endpoint_url=public))
    key = new_key()
    url, headers = await store.presign_put(key, "image/png", 4, "")
    assert url.startswith(public + "/")
    async with httpx.AsyncClient() as http:
        assert (await http.put(url, content=b"\x89PNG", headers=headers)).status_code == 200
        got = await http.get(await store.presign_get(key, "a.png", "image/png", ""))
    assert (got.status_code, got.content) == (200, b"\x89PNG")
    await store.close()
