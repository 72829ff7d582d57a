"""Thin HTTP handlers for the bytes of documents: presigned and direct uploads, completion, downloads, and the
local store's signed object URLs (the embedded profile's stand-in for S3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from litestar import Controller, Request, Response, Router, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import Redirect, Stream
from litestar.types import ControllerRouterHandler
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import PUBLIC, Viewer
from app.audit.service import audit_trail
from app.documents.checks import TooLarge
from app.documents.schemas import CreatedOut, DocumentIn, DocumentOut, UploadOut, document_out
from app.documents.storage import LocalDiskStore, content_disposition, final_key_of
from app.documents.uploads import UploadService
from app.errors import Conflict, Forbidden, NotVisible
from app.links import public_base
from app.services import documents_for
from app.settings import Settings

# a direct upload's form carries its fields and boundaries besides the file; and the framework counts whole network
# reads, so its limit sits a little above the file's own (enforced as the file streams: 413 too_large)
FORM_SLACK = 1024 * 1024
FILE_ROUTES = ("/api/v1/documents/upload", "/api/v1/objects/")  # the routes that take a file's bytes


async def provide_uploads(db_session: NamedDependency[AsyncSession], state: State) -> UploadService:
    return UploadService(db_session, state.settings, state.store, state.database, documents_for(db_session, state))


def origin(request: Request[Any, Any, Any]) -> str:
    """The app's own base URL, where the local store's signed URLs point."""
    return public_base(request)


class DocumentUploadController(Controller):
    path = "/api/v1/documents"
    tags = ["documents"]
    dependencies = {"uploads": Provide(provide_uploads)}

    @post("/", status_code=201)
    async def create(self, request: Request[Viewer, Any, Any], uploads: NamedDependency[UploadService],
                     data: JSONBody[DocumentIn]) -> CreatedOut:
        """A pending document and where to PUT its bytes (exactly `upload.headers`); then complete it."""
        document, url, headers = await uploads.create(request.user, data, origin(request))
        return CreatedOut(document=document_out(document), upload=UploadOut(url=url, method="PUT", headers=headers))

    @post("/{document_id:uuid}/complete", status_code=200)
    async def complete(self, request: Request[Viewer, Any, Any], uploads: NamedDependency[UploadService],
                       document_id: FromPath[UUID]) -> DocumentOut:
        return document_out(await uploads.complete(request.user, document_id))

    @get("/{document_id:uuid}/download", status_code=307)
    async def download(self, request: Request[Viewer, Any, Any], uploads: NamedDependency[UploadService],
                       document_id: FromPath[UUID]) -> Redirect:
        """307 to a short-lived URL answering the file as an attachment."""
        url = await uploads.download_url(request.user, document_id, origin(request), audit_trail(request))
        return Redirect(path=url, status_code=307)


@post("/api/v1/documents/upload", status_code=201, tags=["documents"],
      dependencies={"uploads": Provide(provide_uploads)})
async def direct_upload(request: Request[Viewer, Any, Any], uploads: NamedDependency[UploadService]) -> DocumentOut:
    """A multipart form (the fields of POST /api/v1/documents, then `file`), streamed to storage and checked."""
    return document_out(await uploads.direct(request.user, request.headers.get("content-type", ""),
                                             request.stream()))


def local_store(state: State) -> LocalDiskStore:
    store = state.store
    if not isinstance(store, LocalDiskStore):
        raise NotVisible("no such object")  # with S3, object URLs are the endpoint's
    return store


@put("/api/v1/objects/{key:path}", opt=PUBLIC, include_in_schema=False, status_code=200)
async def put_object(request: Request[Any, Any, Any], state: State, key: FromPath[str],
                     expires: FromQuery[str] = "", size: FromQuery[str] = "", sig: FromQuery[str] = "") -> None:
    """A signed PUT of the local store: the signature binds key, content type, size and expiry."""
    store, key = local_store(state), key.lstrip("/")
    content_type = request.headers.get("content-type", "")
    store.verify_put(key, content_type, size, expires, sig)
    # a URL writes once: not over an upload already there, nor once its document's bytes have been moved (the
    # move already keeps them out of reach; this refuses early). S3 cannot refuse; its move is what protects.
    final = final_key_of(key)
    if await store.head(key) is not None or (final is not None and await store.head(final) is not None):
        raise Conflict("something was already uploaded to this URL; start a new upload", "already_uploaded")
    declared = int(size)
    length = request.headers.get("content-length")
    if length is not None and length != size:
        raise Forbidden("the body is not the size the URL was signed for", "bad_signature")
    writer = await store.writer(key, content_type)
    try:
        async for chunk in request.stream():
            if writer.written + len(chunk) > declared:
                raise TooLarge("the body is larger than the URL was signed for", "too_large")
            await writer.write(chunk)
        if writer.written != declared:
            raise Forbidden("the body is not the size the URL was signed for", "bad_signature")
        await writer.finish()
    except BaseException:
        await writer.abort()
        raise


@get("/api/v1/objects/{key:path}", opt=PUBLIC, include_in_schema=False)
async def get_object(state: State, key: FromPath[str], expires: FromQuery[str] = "", name: FromQuery[str] = "",
                     type: FromQuery[str] = "", sig: FromQuery[str] = "") -> Response[Any]:
    """A signed GET of the local store: the file, streamed, as an attachment."""
    store, key = local_store(state), key.lstrip("/")
    store.verify_get(key, name, type, expires, sig)
    size = await store.head(key)
    if size is None:
        raise NotVisible("no such object")

    async def body() -> AsyncIterator[bytes]:
        async for chunk in store.stream(key):
            yield chunk

    return Stream(body(), media_type=type or "application/octet-stream",
                  headers={"Content-Disposition": content_disposition(name), "Content-Length": str(size),
                           "X-Content-Type-Options": "nosniff"})


def upload_routes(settings: Settings) -> list[ControllerRouterHandler]:
    """The routes of this module; only the two that take a file's bytes admit a body of DOCUMENT_MAX_BYTES (the
    app-wide MAX_BODY_BYTES stays everywhere else)."""
    big = Router(path="/", route_handlers=[direct_upload, put_object],
                 request_max_body_size=settings.document_max_bytes + FORM_SLACK)
    return [DocumentUploadController, big, get_object]
