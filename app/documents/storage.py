"""Object storage behind one interface: any S3-compatible endpoint, or a local directory (embedded).

Both profiles hand out short-lived URLs so that the bytes of an upload or a download never pass through a
request handler holding them: S3 signs them itself; the local store signs them with an HMAC of the app's secret
and the app serves them (app/documents/upload_controllers.py, `/api/v1/objects/...`). Every read and write is
streamed in chunks; nothing holds a whole object in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.errors import Forbidden
from app.settings import Settings

T = TypeVar("T")
CHUNK = 256 * 1024  # what one read or write moves at a time
# keys are generated (`new_key`), never taken from a filename: a prefix and 32 hex digits
KEY = re.compile(r"^[a-z]{1,20}/[0-9a-f]{32}$")


def new_key(prefix: str = "documents") -> str:
    return f"{prefix}/{uuid.uuid4().hex}"


# A presigned URL stays usable until it expires, so the key it writes is never the key a checked document is
# served from: the bytes are PUT to `uploads/<hex>` and moved to `documents/<hex>` (which no URL names) before
# they are checked. The document row keeps the final key; the upload key is derived from it.
UPLOAD_PREFIX, FINAL_PREFIX = "uploads", "documents"


def upload_key(final_key: str) -> str:
    """Where the presigned URL of the document stored under `final_key` writes."""
    return f"{UPLOAD_PREFIX}/{final_key.rsplit('/', 1)[-1]}"


def final_key_of(key: str) -> str | None:
    """The final key an upload key moves to; None for any other key."""
    prefix, _, digest = key.partition("/")
    return f"{FINAL_PREFIX}/{digest}" if prefix == UPLOAD_PREFIX else None


class ObjectWriter(Protocol):
    """A streamed put: chunks in order, then `finish` (the object appears) or `abort` (nothing stays)."""

    written: int

    async def write(self, data: bytes) -> None: ...

    async def finish(self) -> None: ...

    async def abort(self) -> None: ...


class ObjectStore(Protocol):
    name: str

    async def check(self) -> None:
        """Raise when the store cannot take writes."""

    async def start(self) -> None:
        """Make the bucket (or directory) when it is missing."""

    async def close(self) -> None: ...

    async def presign_put(self, key: str, content_type: str, size: int, origin: str) -> tuple[str, dict[str, str]]:
        """A URL to PUT exactly this object with exactly the headers answered; `origin` is the app's own base URL
        (the local store's URLs are served by the app)."""

    async def presign_get(self, key: str, filename: str, content_type: str, origin: str) -> str:
        """A URL answering the object as an attachment named `filename`, for DOCUMENT_URL_SECONDS."""

    async def head(self, key: str) -> int | None:
        """The stored size, or None when there is no such object."""

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes from `start` (fewer at the end of the object)."""

    def stream(self, key: str, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        """The object's bytes in chunks."""

    async def delete(self, key: str) -> None:
        """Remove the object; no error when it is already gone."""

    async def move(self, src: str, dst: str) -> bool:
        """Move the object at `src` to `dst`, never replacing an object already at `dst` (what was checked there
        stays what was checked). False, and nothing changes, when `src` has no object or `dst` already has one."""

    async def writer(self, key: str, content_type: str) -> ObjectWriter: ...


# --- Content-Disposition ------------------------------------------------------------------------------------------

# control characters, what a shell or a path reads, and bidirectional controls (an override makes
# "invoice\u202efdp.exe" read as "invoiceexe.pdf")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\/:*?<>|;\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]')


def safe_filename(name: str) -> str:
    """The last path component, without control or bidirectional characters, quotes, separators or leading dots;
    never empty."""
    name = re.split(r"[\\/]", name)[-1]
    name = _UNSAFE.sub("_", name).strip().lstrip(".").strip()
    return name[:200] or "document"


def content_disposition(filename: str) -> str:
    """RFC 6266: `attachment`, an ASCII fallback name, and the real one as UTF-8 (`filename*`)."""
    name = safe_filename(filename)
    fallback = "".join(c if 32 <= ord(c) < 127 else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


# --- local disk ---------------------------------------------------------------------------------------------------


class LocalDiskStore:
    """Objects as files under data_dir/objects; URLs signed with HMAC-SHA256 and served by the app."""

    name = "local-disk"

    def __init__(self, root: Path, secret: str, url_seconds: int, upload_url_seconds: int) -> None:
        self.root = root
        # a key of its own, derived from SECRET_KEY (never empty: without one, URLs live as long as the process)
        secret = secret or secrets.token_urlsafe(32)
        self._key = hmac.new(secret.encode(), b"object-urls", hashlib.sha256).digest()
        self.url_seconds = url_seconds
        self.upload_url_seconds = upload_url_seconds

    def path(self, key: str) -> Path:
        """Where a key lives; anything but a generated key (a traversal, a filename) is refused."""
        if not KEY.fullmatch(key):
            raise Forbidden("not an object key", "bad_key")
        prefix, digest = key.split("/")
        return self.root / prefix / digest[:2] / digest

    async def check(self) -> None:
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.root, prefix=".probe-")
        os.close(fd)
        os.unlink(path)

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    # signatures: method, key, content type, size or filename, expiry; any change breaks them
    def _sign(self, *parts: str) -> str:
        return hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def _verify(self, expires: str, sig: str, *parts: str) -> None:
        if not hmac.compare_digest(self._sign(*parts, expires).encode(), sig.encode()):  # bytes: any input
            raise Forbidden("the URL's signature does not match", "bad_signature")
        if not expires.isdigit() or int(expires) < time.time():
            raise Forbidden("the URL has expired", "url_expired")

    async def presign_put(self, key: str, content_type: str, size: int, origin: str) -> tuple[str, dict[str, str]]:
        self.path(key)
        expires = str(int(time.time()) + self.upload_url_seconds)
        sig = self._sign("PUT", key, content_type, str(size), expires)
        return (f"{origin}/api/v1/objects/{key}?{urlencode({'expires': expires, 'size': size, 'sig': sig})}",
                {"Content-Type": content_type})

    def verify_put(self, key: str, content_type: str, size: str, expires: str, sig: str) -> None:
        self._verify(expires, sig, "PUT", key, content_type, size)

    async def presign_get(self, key: str, filename: str, content_type: str, origin: str) -> str:
        self.path(key)
        expires = str(int(time.time()) + self.url_seconds)
        sig = self._sign("GET", key, content_type, filename, expires)
        query = urlencode({"expires": expires, "name": filename, "type": content_type, "sig": sig})
        return f"{origin}/api/v1/objects/{key}?{query}"

    def verify_get(self, key: str, filename: str, content_type: str, expires: str, sig: str) -> None:
        self._verify(expires, sig, "GET", key, content_type, filename)

    async def head(self, key: str) -> int | None:
        path = self.path(key)
        try:
            return (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            return None

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self.path(key)

        def read() -> bytes:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(length)

        return await asyncio.to_thread(read)

    async def stream(self, key: str, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(self.path(key).open, "rb")
        try:
            while data := await asyncio.to_thread(f.read, chunk):
                yield data
        finally:
            await asyncio.to_thread(f.close)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path(key).unlink, missing_ok=True)

    async def move(self, src: str, dst: str) -> bool:
        source, target = self.path(src), self.path(dst)

        def move() -> bool:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)  # unlike os.replace, fails when the target exists: never overwrites
            except (FileNotFoundError, FileExistsError):
                return False
            source.unlink(missing_ok=True)
            return True

        return await asyncio.to_thread(move)

    async def writer(self, key: str, content_type: str) -> LocalWriter:
        target = self.path(key)

        def open_temp() -> Any:
            target.parent.mkdir(parents=True, exist_ok=True)
            # a temporary name beside the target: the object appears whole (os.replace) or not at all
            return tempfile.NamedTemporaryFile(dir=target.parent, prefix=".up-", delete=False)

        return LocalWriter(await asyncio.to_thread(open_temp), target)


class LocalWriter:
    """Chunks gathered to about 1 MiB per write: one thread hop per MiB, not per network read."""

    def __init__(self, file: Any, target: Path) -> None:
        self.file, self.target, self.written = file, target, 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.written += len(data)
        if self._pending_bytes >= 1024 * 1024:
            await self._flush()

    async def _flush(self) -> None:
        data, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
        await asyncio.to_thread(self.file.write, data)

    async def finish(self) -> None:
        await self._flush()

        def done() -> None:
            self.file.close()
            os.replace(self.file.name, self.target)

        await asyncio.to_thread(done)

    async def abort(self) -> None:
        def drop() -> None:
            self.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file.name)

        await asyncio.to_thread(drop)


# --- S3 -----------------------------------------------------------------------------------------------------------


class S3Store:
    """Any S3-compatible endpoint through boto3, whose blocking calls run in a thread pool of their own (never
    on the event loop, and never starving the loop's default executor)."""

    name = "s3"

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.url_seconds = settings.document_url_seconds
        self.upload_url_seconds = settings.document_upload_url_seconds
        self.part_bytes = max(settings.s3_part_bytes, 5 * 1024 * 1024)  # S3's minimum for all but the last part
        # SSE-S3 on every write (puts, multipart, presigned PUTs); empty: the endpoint's default
        self.sse: dict[str, str] = {"ServerSideEncryption": settings.s3_sse} if settings.s3_sse else {}
        self.pool = ThreadPoolExecutor(max_workers=settings.s3_threads, thread_name_prefix="s3")
        self._client: Any = self._make_client(settings, settings.s3_endpoint_url)
        # clients may reach the endpoint under another name than the app does (a proxy, a public host): URLs
        # handed out are signed for that one (signing is local: this client never connects)
        self._signer: Any = (self._make_client(settings, settings.s3_public_endpoint_url)
                             if settings.s3_public_endpoint_url else self._client)

    @staticmethod
    def _make_client(settings: Settings, endpoint: str | None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key,
            region_name=settings.s3_region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": settings.s3_addressing_style},  # type: ignore[arg-type]
                connect_timeout=2,
                read_timeout=30,
                retries={"max_attempts": 2},
                max_pool_connections=settings.s3_threads,
                # only where the operation needs one: a presigned PUT must not demand a checksum the browser
                # cannot compute, and not every S3-compatible server knows the newer checksum headers
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def check(self) -> None:
        await self.run(self._client.head_bucket, Bucket=self.bucket)

    async def start(self) -> None:
        def create() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError:
                with contextlib.suppress(self._client.exceptions.BucketAlreadyOwnedByYou,
                                         self._client.exceptions.BucketAlreadyExists):  # another instance won
                    self._client.create_bucket(Bucket=self.bucket)

        await self.run(create)

    async def ensure_bucket(self) -> None:
        await self.start()

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def presign_put(self, key: str, content_type: str, size: int, origin: str) -> tuple[str, dict[str, str]]:
        params = {"Bucket": self.bucket, "Key": key, "ContentType": content_type, "ContentLength": size, **self.sse}
        url = await self.run(self._signer.generate_presigned_url, "put_object", Params=params,
                             ExpiresIn=self.upload_url_seconds)
        headers = {"Content-Type": content_type}
        if self.sse:  # signed into the URL, so the client must send it as it is
            headers["x-amz-server-side-encryption"] = self.sse["ServerSideEncryption"]
        return str(url), headers

    async def presign_get(self, key: str, filename: str, content_type: str, origin: str) -> str:
        params = {"Bucket": self.bucket, "Key": key, "ResponseContentDisposition": content_disposition(filename),
                  "ResponseContentType": content_type}
        url = await self.run(self._signer.generate_presigned_url, "get_object", Params=params,
                             ExpiresIn=self.url_seconds)
        return str(url)

    async def head(self, key: str) -> int | None:
        try:
            answer = await self.run(self._client.head_object, Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(answer["ContentLength"])

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        def read() -> bytes:
            try:
                answer = self._client.get_object(Bucket=self.bucket, Key=key,
                                                 Range=f"bytes={start}-{start + length - 1}")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object
                    return b""
                raise
            with contextlib.closing(answer["Body"]) as body:
                return bytes(body.read())

        return await self.run(read)

    async def stream(self, key: str, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        answer = await self.run(self._client.get_object, Bucket=self.bucket, Key=key)
        body = answer["Body"]
        try:
            while data := await self.run(body.read, chunk):
                yield data
        finally:
            await self.run(body.close)

    async def delete(self, key: str) -> None:
        await self.run(self._client.delete_object, Bucket=self.bucket, Key=key)

    async def move(self, src: str, dst: str) -> bool:
        def move() -> bool:
            # a server-side copy (the bytes never come here), encrypted like every other write; If-None-Match
            # keeps an object already at dst, and the head before it covers endpoints that ignore that header
            if self._exists(dst):
                return False
            try:
                self._client.copy_object(Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src},
                                         MetadataDirective="COPY", IfNoneMatch="*", **self.sse)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound",
                                                                  "PreconditionFailed", "412"):
                    return False
                raise
            self._client.delete_object(Bucket=self.bucket, Key=src)
            return True

        return await self.run(move)

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    async def writer(self, key: str, content_type: str) -> S3Writer:
        return S3Writer(self, key, content_type)


PARTS_IN_FLIGHT = 2  # parts of one upload sent at once: the endpoint's latency overlaps, memory stays ~3 parts


class S3Writer:
    """A streamed put: parts of S3_PART_BYTES go out as multipart while the next one fills (PARTS_IN_FLIGHT at a
    time, so memory stays a few parts whatever the file's size); an object smaller than one part is a single PUT.
    Any failure aborts the multipart upload, so no parts are left behind."""

    def __init__(self, store: S3Store, key: str, content_type: str) -> None:
        self.store, self.key, self.content_type = store, key, content_type
        self.client = store._client
        self.written = 0
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._in_flight: list[asyncio.Future[None]] = []

    async def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.written += len(data)
        if self._buffered >= self.store.part_bytes:
            await self._send_part()

    def _take(self) -> bytes:
        body = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        return body

    async def _send_part(self) -> None:
        if self._upload_id is None:
            answer = await self.store.run(self.client.create_multipart_upload, Bucket=self.store.bucket,
                                          Key=self.key, ContentType=self.content_type, **self.store.sse)
            self._upload_id = answer["UploadId"]
        if len(self._in_flight) >= PARTS_IN_FLIGHT:  # bounded memory: this many parts sent, one filling
            await self._in_flight.pop(0)
        number, body = len(self._parts) + 1, self._take()
        self._parts.append({"PartNumber": number})
        entry = self._parts[-1]

        def upload() -> None:
            answer = self.client.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=self._upload_id,
                                             PartNumber=number, Body=body)
            entry["ETag"] = answer["ETag"]

        self._in_flight.append(asyncio.ensure_future(self.store.run(upload)))

    async def finish(self) -> None:
        try:
            if self._upload_id is None:
                body = self._take()
                await self.store.run(self.client.put_object, Bucket=self.store.bucket, Key=self.key, Body=body,
                                     ContentType=self.content_type, **self.store.sse)
                return
            if self._buffered:
                await self._send_part()
            while self._in_flight:
                await self._in_flight.pop(0)
            await self.store.run(self.client.complete_multipart_upload, Bucket=self.store.bucket, Key=self.key,
                                 UploadId=self._upload_id, MultipartUpload={"Parts": self._parts})
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        self._chunks, self._buffered = [], 0
        while self._in_flight:
            with contextlib.suppress(Exception):
                await self._in_flight.pop(0)
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            with contextlib.suppress(*STORE_ERRORS):
                await self.store.run(self.client.abort_multipart_upload, Bucket=self.store.bucket, Key=self.key,
                                     UploadId=upload_id)


STORE_ERRORS = (OSError, BotoCoreError, ClientError)


def object_store(settings: Settings) -> LocalDiskStore | S3Store:
    if settings.s3_endpoint_url:
        return S3Store(settings)
    return LocalDiskStore(settings.objects_dir, settings.secret_key, settings.document_url_seconds,
                          settings.document_upload_url_seconds)
