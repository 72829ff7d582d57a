"""The bytes of documents: presigned and direct uploads, their checks, downloads, and dropping stale uploads.

Who may upload or see what is DocumentService's (app/documents/service.py); this module moves and checks bytes
through the object store (app/documents/storage.py) and never holds a whole file in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from uuid import UUID

import msgspec
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from prometheus_client import Counter
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Role, Viewer
from app.accounts.service import utcnow
from app.audit.service import AuditTrail
from app.db import Database
from app.documents.checks import SNIFF_BYTES, NotAllowed, PdfScanner, TooLarge, check_type, family_of
from app.documents.models import Document
from app.documents.schemas import DocumentIn
from app.documents.service import DocumentService
from app.documents.storage import STORE_ERRORS, ObjectStore, ObjectWriter, new_key, safe_filename, upload_key
from app.errors import Conflict, DomainError, Invalid, NotVisible
from app.observability import count_after_commit
from app.settings import Settings

log = logging.getLogger("app.documents")
SCAN_CHUNK = 1024 * 1024  # a stored PDF is read back in chunks of this size to be scanned
FIELD_MAX = 1024  # a form field besides the file (ids, kind, filename...) is short
FIELDS = frozenset({"patient_id", "kind", "filename", "content_type", "size", "consultation_id"})
EXPIRED = "upload_expired"
PRESIGNED, DIRECT = "presigned", "direct"  # the `path` label: PUT to a URL then complete, or the streamed form

UPLOADED_BYTES = Counter("clinic_document_upload_bytes_total", "Bytes of uploads accepted (documents ready)",
                         ["path"])
UPLOADS = Counter("clinic_document_uploads_total", "Uploads accepted (documents ready)", ["path"])
REJECTED = Counter("clinic_document_uploads_rejected_total",
                   "Uploads refused for their file, by the reason answered (too_large, type_mismatch, ...)",
                   ["path", "reason"])
DOWNLOAD_URLS = Counter("clinic_document_download_urls_total", "Download URLs issued")
for _path in (PRESIGNED, DIRECT):  # from zero, so a rate over them exists before the first upload
    UPLOADED_BYTES.labels(_path)
    UPLOADS.labels(_path)


def accepted(session: AsyncSession, path: str, size: int) -> None:
    """Counted once the ready document is committed (the request's commit, after the service)."""
    def count() -> None:
        UPLOADS.labels(path).inc()
        UPLOADED_BYTES.labels(path).inc(size)
    count_after_commit(session, count)


def rejected(path: str, refused: DomainError) -> None:
    REJECTED.labels(path, str(refused.extra["reason"])).inc()


class DirectIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The form fields of a direct upload; `size` is optional there (the bytes say it), checked when given."""

    patient_id: UUID
    kind: str
    filename: str = ""
    content_type: str = ""
    size: int | None = None
    consultation_id: UUID | None = None


def refusal(reason: str) -> DomainError:
    """The error a rejected document answers with, every time it is completed again."""
    if reason in ("too_large", "size_mismatch"):
        detail = "the file is larger than allowed" if reason == "too_large" else "the file is not the size declared"
        return TooLarge(detail, reason)
    if reason == EXPIRED:
        return Conflict("the upload was not completed in time; start a new one", EXPIRED)
    return NotAllowed("the file was refused", reason)


def is_staff(viewer: Viewer) -> bool:
    return any(role != Role.PATIENT for role in viewer.roles)


class UploadService:
    def __init__(self, session: AsyncSession, settings: Settings, store: ObjectStore, database: Database,
                 documents: DocumentService) -> None:
        self.session, self.settings, self.store, self.database = session, settings, store, database
        self.documents = documents
        self.max_bytes = settings.document_max_bytes

    # --- what can be refused before any byte is sent -----------------------------------------------------------

    async def _permit(self, viewer: Viewer, data: DocumentIn, documents: DocumentService | None = None) -> str:
        """Refuse what the declaration already shows; answers the role the caller uploads as (DocumentService
        checks the patient, the kind and the consultation, through `documents` when given)."""
        if data.size > self.max_bytes:
            raise TooLarge(f"files are limited to {self.max_bytes} bytes", "too_large")
        family_of(data.content_type)
        return await (documents or self.documents).may_upload(viewer, data.patient_id, data.kind,
                                                              data.consultation_id)

    def _new(self, viewer: Viewer, data: DocumentIn, role: str) -> Document:
        document = Document(patient_id=data.patient_id, kind=data.kind, filename=safe_filename(data.filename),
                            content_type=data.content_type.split(";")[0].strip().lower(), size=data.size,
                            status="pending", author_id=viewer.id, author_role=role,
                            consultation_id=data.consultation_id, storage_key=new_key())
        self.session.add(document)
        return document

    # --- presigned upload --------------------------------------------------------------------------------------

    async def create(self, viewer: Viewer, data: DocumentIn, origin: str) -> tuple[Document, str, dict[str, str]]:
        """A pending document and the URL its bytes go to (bound to the declared type and size)."""
        try:
            role = await self._permit(viewer, data)
        except (TooLarge, NotAllowed) as refused:
            rejected(PRESIGNED, refused)
            raise
        document = self._new(viewer, data, role)
        await self.session.flush()
        # the URL writes the upload key, never the final one the document is served from (storage.upload_key)
        url, headers = await self.store.presign_put(upload_key(document.storage_key), document.content_type,
                                                    document.size, origin)
        return document, url, headers

    async def complete(self, viewer: Viewer, document_id: UUID) -> Document:
        """Check what was uploaded; ready, or rejected (object removed) with the reason. Twice: the same answer."""
        document = await self.documents.visible(viewer, document_id)
        if document.author_id != viewer.id:
            raise NotVisible("document not found")  # only its uploader completes an upload
        if document.status == "ready":
            return document
        if document.status == "rejected":
            raise refusal(document.reject_reason or "type_mismatch")
        await self.session.commit()  # nothing written yet: no connection held while the object is read back
        # the bytes leave the key the URL writes first, then are checked where no URL writes: a PUT racing the
        # checks, or coming after them, cannot change what they saw. A move never replaces the final object, so
        # a second complete checks the same bytes (and one that crashed after the move is retried here).
        await self.store.move(upload_key(document.storage_key), document.storage_key)
        size = await self.store.head(document.storage_key)
        if size is None:  # nothing uploaded, or a concurrent complete decided (and dropped a refused file)
            await self.session.refresh(document)
            if document.status == "ready":
                return document
            if document.status == "rejected":
                raise refusal(document.reject_reason or EXPIRED)
            raise Conflict("nothing was uploaded to the URL yet", "upload_missing")
        try:
            if size > self.max_bytes:
                raise TooLarge(f"files are limited to {self.max_bytes} bytes", "too_large")
            if size != document.size:
                raise TooLarge("the file is not the size declared", "size_mismatch")
            family = check_type(await self.store.read_range(document.storage_key, 0, SNIFF_BYTES),
                                document.content_type)
            if family == "pdf":
                scanner = PdfScanner(self.settings.document_scan_inflate_bytes)
                async for chunk in self.store.stream(document.storage_key, SCAN_CHUNK):
                    await asyncio.to_thread(scanner.feed, chunk)  # CPU work: off the event loop
                await asyncio.to_thread(scanner.finish)
        except (TooLarge, NotAllowed) as refused:
            await self._reject(document, str(refused.extra["reason"]))
            raise
        # a concurrent complete (or the expiry sweep) may have decided meanwhile: the row lock orders them
        await self.session.refresh(document, with_for_update=True)
        if document.status == "ready":
            return document
        if document.status == "rejected":
            raise refusal(document.reject_reason or EXPIRED)
        await self.documents.became_ready(document)
        accepted(self.session, PRESIGNED, size)
        return document

    async def _reject(self, document: Document, reason: str) -> None:
        """The rejection is committed on its own (the answer is an error and the request's transaction rolls
        back), then the object goes: only when this claimed the row, since a concurrent complete that made the
        document ready serves those bytes."""
        async with self.database.writer() as session:
            claimed = await session.execute(update(Document).where(Document.id == document.id,
                                                                   Document.status == "pending")
                                            .values(status="rejected", reject_reason=reason, completed_at=utcnow()))
            await session.commit()
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return
        REJECTED.labels(PRESIGNED, reason).inc()  # this complete decided it: counted once
        await drop_objects(self.store, document.storage_key, document.id, "deleting a rejected upload failed")

    # --- direct (streamed) upload ------------------------------------------------------------------------------

    async def direct(self, viewer: Viewer, content_type: str, body: AsyncIterator[bytes]) -> Document:
        """A multipart form streamed from the request to storage as it comes: fields first, then `file`.

        The type is checked on the first bytes, a PDF scanned on the way, the size capped as it grows; any
        refusal aborts the storage upload, so nothing stays behind."""
        kind, options = parse_options_header(content_type or "")
        boundary = options.get("boundary")
        if kind != "multipart/form-data" or not boundary:
            raise Invalid("send a multipart/form-data body", "multipart_required")
        upload = DirectUpload(self, viewer)
        try:
            parser = PushMultipartParser(boundary, max_header_size=4096, max_header_count=8, max_segment_count=16)
            async for chunk in body:
                for event in parser.parse(chunk):
                    await upload.event(event)
                if upload.done:
                    break
            else:
                for event in parser.parse(b""):
                    await upload.event(event)
            return await upload.finish()
        except MultipartError as exc:
            await upload.abort()
            raise Invalid("the multipart body is malformed", "multipart_malformed") from exc
        except (TooLarge, NotAllowed) as refused:
            rejected(DIRECT, refused)
            await upload.abort()
            raise
        except BaseException:
            await upload.abort()
            raise

    # --- download ----------------------------------------------------------------------------------------------

    async def download_url(self, viewer: Viewer, document_id: UUID, origin: str, audit: AuditTrail) -> str:
        """A short-lived URL of a ready document the caller may see; staff downloads are audited."""
        document = await self.documents.visible(viewer, document_id)
        if document.status != "ready":
            raise Conflict("the document is not ready", "not_ready")
        audit.read("document.download", "document", document.id, document.patient_id, own=not is_staff(viewer))
        url = await self.store.presign_get(document.storage_key, document.filename, document.content_type, origin)
        DOWNLOAD_URLS.inc()
        return url


class DirectUpload:
    """The state of one streamed form: its fields, then the file going to storage."""

    def __init__(self, uploads: UploadService, viewer: Viewer) -> None:
        self.uploads, self.viewer = uploads, viewer
        self.fields: dict[str, str] = {}
        self.segment: MultipartSegment | None = None
        self.value = bytearray()
        self.data: DocumentIn | None = None
        self.role = ""
        self.key = ""
        self.writer: ObjectWriter | None = None
        self.head = bytearray()  # the first bytes, until the type is known
        self.family: str | None = None
        self.scanner: PdfScanner | None = None
        self.declared_size: int | None = None  # optional here; checked against the bytes when given
        self.done = False
        self.stored = False

    async def event(self, event: MultipartSegment | bytes | bytearray | None) -> None:
        if isinstance(event, MultipartSegment):
            if self.done:
                raise Invalid("the file must be the form's last part", "file_not_last")
            self.segment, self.value = event, bytearray()
            if event.name == "file":
                await self._start_file(event)
            elif event.name not in FIELDS or event.name in self.fields:
                raise Invalid(f"unexpected form field {event.name!r}", "invalid_input")
        elif event is None:
            if self.segment is not None and self.segment.name == "file":
                await self._end_file()
            elif self.segment is not None and self.segment.name is not None:
                self.fields[self.segment.name] = self.value.decode("utf-8", "replace")
            self.segment = None
        elif self.segment is not None and self.segment.name == "file":
            await self._file_bytes(bytes(event))
        else:
            self.value += event
            if len(self.value) > FIELD_MAX:
                raise Invalid("a form field is too long", "invalid_input")

    async def _start_file(self, segment: MultipartSegment) -> None:
        fields = dict(self.fields)
        fields.setdefault("filename", segment.filename or "")
        fields.setdefault("content_type", segment.content_type or "")
        try:
            given = msgspec.convert(fields, DirectIn, strict=False)
        except msgspec.ValidationError as exc:
            raise Invalid(f"invalid input: {exc}", "invalid_input") from exc
        try:
            self.data = msgspec.convert({**msgspec.structs.asdict(given), "size": given.size or 1}, DocumentIn)
        except msgspec.ValidationError as exc:
            raise Invalid(f"invalid input: {exc}", "invalid_input") from exc
        self.declared_size = given.size
        uploads = self.uploads
        # nothing is written until the bytes pass, so the checks read through the autocommit reader (no BEGIN
        # and COMMIT around them) and no database connection is held while the file streams
        async with uploads.database.reader() as reading:
            self.role = await uploads._permit(self.viewer, self.data, uploads.documents.on(reading))
        self.key = new_key()
        self.writer = await uploads.store.writer(self.key, self.data.content_type)

    async def _file_bytes(self, data: bytes) -> None:
        assert self.writer is not None
        assert self.data is not None
        if self.writer.written + len(self.head) + len(data) > self.uploads.max_bytes:
            raise TooLarge(f"files are limited to {self.uploads.max_bytes} bytes", "too_large")
        if self.family is None:
            self.head += data
            if len(self.head) < SNIFF_BYTES:
                return
            data, self.head = bytes(self.head), bytearray()
            self._typed(data)
        if self.scanner is not None:
            await asyncio.to_thread(self.scanner.feed, data)  # CPU work: off the event loop
        await self.writer.write(data)

    def _typed(self, head: bytes) -> None:
        assert self.data is not None
        self.family = check_type(head, self.data.content_type)
        if self.family == "pdf":
            self.scanner = PdfScanner(self.uploads.settings.document_scan_inflate_bytes)

    async def _end_file(self) -> None:
        assert self.writer is not None
        if self.family is None:  # a file shorter than the sniffed prefix
            data, self.head = bytes(self.head), bytearray()
            self._typed(data)
            if self.scanner is not None:
                await asyncio.to_thread(self.scanner.feed, data)
            await self.writer.write(data)
        if self.scanner is not None:
            await asyncio.to_thread(self.scanner.finish)
        size = self.writer.written
        if size == 0:
            raise Invalid("the file is empty", "file_empty")
        if self.declared_size is not None and self.declared_size != size:
            raise TooLarge("the file is not the size declared", "size_mismatch")
        self.done = True  # every check passed: what is left is storing the last bytes (`finish`)

    async def _store(self) -> None:
        assert self.writer is not None
        await self.writer.finish()
        self.stored = True

    async def finish(self) -> Document:
        """The last bytes go to storage (the single PUT of a small file, the last part and the completion of a
        large one) while the ready row and its event are written in the request's transaction: the two round
        trips overlap instead of adding up. The transaction commits only after the object is stored (the
        handler returns then); a failure of either side rolls the row back and `abort` removes the object."""
        if not self.done or self.data is None or self.writer is None:
            raise Invalid("the form has no file", "file_required")
        uploads = self.uploads
        document = uploads._new(self.viewer, msgspec.structs.replace(self.data, size=self.writer.written),
                                self.role)
        document.storage_key = self.key
        storing = asyncio.ensure_future(self._store())
        try:
            await uploads.documents.became_ready(document)  # its flush inserts the row, already ready
        except BaseException:
            await asyncio.wait([storing])  # its outcome says what `abort` has to remove
            if not storing.cancelled():
                storing.exception()  # retrieved: the database's error is the one raised
            raise
        await storing
        accepted(uploads.session, DIRECT, self.writer.written)
        return document

    async def abort(self) -> None:
        """Nothing stays: the storage upload aborted, or the stored object removed (the row is rolled back)."""
        if self.writer is not None and not self.stored:
            await self.writer.abort()
        elif self.stored:
            with contextlib.suppress(*STORE_ERRORS):
                await self.uploads.store.delete(self.key)


# --- uploads never completed --------------------------------------------------------------------------------------


async def expire_pending(database: Database, store: ObjectStore, older_than: dt.timedelta,
                         batch: int = 100) -> int:
    """Pending documents older than `older_than` become rejected (`upload_expired`) and their objects go.

    Each row is claimed by a conditional update (still pending): of two instances sweeping at once, one wins
    each row and deletes its object, the other skips it. The row stays (rejected) so a late complete answers
    why."""
    cutoff = utcnow() - older_than
    async with database.reader() as session:
        rows = (await session.execute(select(Document.id, Document.storage_key).where(
            Document.status == "pending", Document.created_at < cutoff).order_by(Document.created_at)
            .limit(batch))).all()
    expired = 0
    for document_id, key in rows:
        async with database.writer() as session:
            claimed = await session.execute(update(Document).where(Document.id == document_id,
                                                                   Document.status == "pending")
                                            .values(status="rejected", reject_reason=EXPIRED, completed_at=utcnow()))
            await session.commit()
        if claimed.rowcount == 1:  # type: ignore[attr-defined]
            expired += 1
            REJECTED.labels(PRESIGNED, EXPIRED).inc()
            await drop_objects(store, key, document_id, "deleting an expired upload failed")
    return expired


async def drop_objects(store: ObjectStore, key: str, document_id: UUID, failure: str) -> None:
    """A refused or expired document's objects: where its URL wrote, and where a complete moved the bytes."""
    for each in (upload_key(key), key):
        try:
            await store.delete(each)
        except STORE_ERRORS:
            log.exception(failure, extra={"document_id": str(document_id), "key": each})


async def keep_pending_clean(database: Database, store: ObjectStore, settings: Settings) -> None:
    """Runs for the process's life (app/main.py): sweeps uploads never completed."""
    older_than = dt.timedelta(seconds=settings.document_pending_seconds)
    interval = min(max(settings.document_pending_seconds / 2, 0.2), 300.0)
    while True:
        try:
            while await expire_pending(database, store, older_than) > 0:
                pass  # a full batch: there may be more
        except Exception:  # a passing database or storage hiccup must not end the loop
            log.exception("expiring pending uploads failed")
        await asyncio.sleep(interval)
