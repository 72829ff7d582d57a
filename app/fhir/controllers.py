"""Thin HTTP handlers of the FHIR R4 read API under /fhir/R4 (docs/fhir.md).

Every answer is `application/fhir+json`; every refusal an OperationOutcome with the status the REST API would
give, except that a malformed request is 400 here (FHIR's convention) where REST says 422. Who may read what
is decided by the REST reads these handlers call (app/fhir/service.py); nothing here adds or loosens a rule.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, get
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import PathParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import PUBLIC, Viewer
from app.errors import DomainError, error_response
from app.fhir import capability, resources, service
from app.fhir.search import parse
from app.links import public_base

FHIR_JSON = "application/fhir+json"
FHIR_OK = {200: ResponseSpec(dict[str, Any], media_type=FHIR_JSON, description="A FHIR R4 resource or Bundle")}
BASE_PATH = "/fhir/R4"
ResourceType = Annotated[str, PathParameter(
    description="A resource type this server serves (GET /fhir/R4/metadata lists them).",
    examples=[Example(value="Appointment")])]
ResourceId = Annotated[str, PathParameter(description="The resource's id.",
                                          examples=[Example(value="0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")])]


def fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def outcome_response(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Any refusal as an OperationOutcome: status, sentence and reason code as the REST error handler works
    them out (it also logs the unexpected ones), a malformed request 400."""
    answer = error_response(request, exc)
    body: dict[str, Any] = answer.content
    status = 400 if body["status_code"] == 422 else int(body["status_code"])
    return fhir(resources.operation_outcome(status, str(body["detail"]), body["extra"].get("reason")), status,
                dict(answer.headers))


def _query(request: Request[Any, Any, Any]) -> dict[str, list[str]]:
    params = request.query_params
    return {name: [str(v) for v in params.getall(name)] for name in params}


def _bases(request: Request[Any, Any, Any]) -> tuple[str, str]:
    """The app's own base URL (for download links) and the FHIR base (for references and paging links)."""
    app_base = public_base(request)
    return app_base, app_base + BASE_PATH


@get("/metadata", opt=PUBLIC, media_type=FHIR_JSON, responses=FHIR_OK)
async def metadata(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The CapabilityStatement: open, as FHIR servers serve it (it holds no data)."""
    return fhir(capability.statement(_bases(request)[1]))


@get("/{resource_type:str}/{ident:str}", media_type=FHIR_JSON, responses=FHIR_OK)
async def read(request: Request[Viewer, Any, Any], db_session: NamedDependency[AsyncSession],
               resource_type: ResourceType, ident: ResourceId) -> Response[bytes]:
    return fhir(await service.read(request, db_session, resource_type, ident, *_bases(request)))


@get("/{resource_type:str}", media_type=FHIR_JSON, responses=FHIR_OK)
async def search(request: Request[Viewer, Any, Any], db_session: NamedDependency[AsyncSession],
                 resource_type: ResourceType) -> Response[bytes]:
    allowed = capability.search_parameters(resource_type)
    wanted = parse(_query(request), allowed)
    return fhir(await service.search(request, db_session, resource_type, wanted, *_bases(request)))


fhir_router = Router(path=BASE_PATH, route_handlers=[metadata, read, search], tags=["fhir"],
                     exception_handlers={DomainError: outcome_response, HTTPException: outcome_response,
                                         Exception: outcome_response})
