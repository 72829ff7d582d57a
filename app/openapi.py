"""The API page and its document: Swagger UI served by the app itself, and every parameter explained.

Clinics often run without internet, so the page loads nothing from outside: its scripts and styles come from
the swagger-ui-bundle-v2 package, served under /schema/assets. Parameters are explained here, by name, once
for the whole API (a `limit` means the same everywhere), and filled into the generated document at start-up;
tests/integration/test_operational_surfaces.py fails on a parameter this table does not explain, and start-up
warns naming it.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar, Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import OpenAPI, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Reference, Schema
from litestar.static_files import create_static_files_router
from swagger_ui_bundle import swagger_ui_path

from app.access import PUBLIC

log = logging.getLogger(__name__)
SCHEMA_PATH = "/schema"
ASSETS_PATH = f"{SCHEMA_PATH}/assets"  # under /schema: public, like the page itself

_ID = "0193a0c4-5b7e-7c3d-9f10-2b8e4a6d1c55"

# name -> (description, example). A route's own description (Parameter(description=...)) wins over this one.
PARAMETERS: dict[str, tuple[str, Any]] = {
    "limit": ("How many items one page holds at most.", 50),
    "cursor": ("Where the next page starts: the `next_cursor` of the previous page, as it was given.", _ID),
    "from": ("Start of the period: a date (YYYY-MM-DD, midnight in the caller's zone) or an ISO 8601 instant; "
             "between the years 2000 and 2099.", "2026-12-01"),
    "to": ("End of the period (exclusive; a date means the end of that day): a date (YYYY-MM-DD) or an ISO 8601 "
           "instant, at most 93 days after `from`.", "2026-12-07"),
    "tz": ("The IANA time zone that dates are read in and times answered in; default: the caller's zone.",
           "Europe/Moscow"),
    "status": ("Only items in this status (one of the values this route lists).", "confirmed"),
    "specialty": ("Only this specialty (one of the specialty codes).", "pediatrics"),
    "code": ("The specialty's code.", "pediatrics"),
    "q": ("Search text: part of a patient's name or phone number (at most 100 characters).", "Ivanov"),
    "tab": ("`actual`: patients with a visit ahead or in progress; `archive`: the others.", "actual"),
    "before": ("Page backwards: only messages older than this message id.", _ID),
    "after": ("Page forwards: only messages newer than this message id.", _ID),
    "consultation_id": ("The consultation's id.", _ID),
    "call_id": ("The call's id (from starting it, or a `call.incoming` event).", _ID),
    "conversation_id": ("The conversation's id (a consultation's `conversation_id`).", _ID),
    "message_id": ("The message's id.", _ID),
    "device_id": ("The device's id, as registered.", _ID),
    "order_id": ("The analysis order's id.", _ID),
    "patient_id": ("The patient's id (a dependent's id for a parent's dependent).", _ID),
    "dependent_id": ("The dependent's id.", _ID),
    "request_id": ("The waitlist request's id.", _ID),
    "slot_id": ("The slot's id.", _ID),
    "specialist_id": ("The specialist's id.", _ID),
    "staff_id": ("The staff member's id.", _ID),
    "service_id": ("The service's id.", _ID),
    "document_id": ("The document's id.", _ID),
    "kind": ("Only documents of this kind: analysis, conclusion, referral, image or other.", "analysis"),
    "analysis_id": ("The analysis' id.", _ID),
    "payment_id": ("The payment's id.", _ID),
    "refund_id": ("The refund's id.", _ID),
    "user_id": ("The user's id.", _ID),
    "id": ("The item's id.", _ID),
    "ticket": ("A single-use socket ticket from POST /api/v1/ws/ticket.", "k3Hq0xWc9d1m8Zp2Rt5vYb7nLs4Af6Ge"),
    "token": ("An access token (prefer a ticket: URLs end up in logs elsewhere).", "eyJhbGciOiJIUzI1NiJ9..."),
    "idempotence-key": ("Makes a retried request safe: the same key answers the first request's result.",
                        "5d9f3c2a-8b1e-4f7a-9c6d-0e2b4a8f1d3c"),
    "idempotency-key": ("Makes a retried request safe: the same key answers the first request's result.",
                        "5d9f3c2a-8b1e-4f7a-9c6d-0e2b4a8f1d3c"),
    "if-none-match": ("The ETag of a copy the caller holds: 304 when it is still current.", '"3f2a9c"'),
}


def render_plugin() -> SwaggerRenderPlugin:
    """Swagger UI at /schema, every asset from our own route."""
    return SwaggerRenderPlugin(
        path=["/", "/swagger"],
        js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        css_url=f"{ASSETS_PATH}/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>",
    )


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(title="Clinic API", version="1", path=SCHEMA_PATH, render_plugins=[render_plugin()])


def assets_router() -> Router:
    return create_static_files_router(path=ASSETS_PATH, directories=[swagger_ui_path], opt=PUBLIC,
                                      include_in_schema=False)


def document_parameters(openapi: OpenAPI) -> list[str]:
    """Fill each parameter's missing description and example from PARAMETERS; the names it has no entry for."""
    unknown = []
    for path_item in (openapi.paths or {}).values():
        for method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            operation = getattr(path_item, method, None)
            if not isinstance(operation, Operation):
                continue
            for parameter in operation.parameters or []:
                if isinstance(parameter, Reference):
                    continue
                known = PARAMETERS.get(parameter.name.lower())
                if known is None:
                    if not (parameter.description and (parameter.example is not None or parameter.examples)):
                        unknown.append(parameter.name)
                    continue
                described, example = known
                if not parameter.description:
                    parameter.description = described
                if parameter.example is None and not parameter.examples:
                    parameter.example = first_allowed(parameter.schema) or example
    return unknown


def first_allowed(schema: Schema | Reference | None) -> Any:
    """An enumerated parameter's example is one of its values (a generic one may not be allowed there)."""
    if not isinstance(schema, Schema):
        return None
    if schema.enum:
        return schema.enum[0]
    for option in schema.one_of or schema.any_of or []:
        if (value := first_allowed(option)) is not None:
            return value
    return None


# every refusal the error handler (app/errors.py) can give, with API.md's body; FHIR answers an OperationOutcome
REFUSALS = {"401": "Not signed in, or the access was revoked.", "403": "The caller's role may not do this.",
            "404": "Absent, or not the caller's to see.", "409": "The resource is not in a state that allows this.",
            "413": "The body or file is too large.", "415": "The file's type is not accepted.",
            "422": "The input breaks a rule; `extra.reason` says which.", "429": "Too many requests: see Retry-After.",
            "503": "A service the API needs is down for now: see Retry-After."}
ERROR_BODY = Schema(type=OpenAPIType.OBJECT, required=["status_code", "detail", "extra"], properties={
    "status_code": Schema(type=OpenAPIType.INTEGER), "detail": Schema(type=OpenAPIType.STRING),
    "extra": Schema(type=OpenAPIType.OBJECT, additional_properties=True)})
FHIR_OUTCOME = Schema(type=OpenAPIType.OBJECT, required=["resourceType"], additional_properties=True)


def document_refusals(openapi: OpenAPI) -> None:
    for path, path_item in (openapi.paths or {}).items():
        fhir = path.startswith("/fhir/")
        media = OpenAPIMediaType(schema=FHIR_OUTCOME if fhir else ERROR_BODY)
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(path_item, method, None)
            if not isinstance(operation, Operation):
                continue
            responses = operation.responses if operation.responses is not None else {}
            for code, description in REFUSALS.items():
                responses.setdefault(code, OpenAPIResponse(
                    description=description,
                    content={"application/fhir+json" if fhir else "application/json": media}))
            operation.responses = responses


def on_startup(app: Litestar) -> None:
    """Build the document once, then explain its parameters (the document is cached: pages serve this one)."""
    document_refusals(app.openapi_schema)
    if unknown := document_parameters(app.openapi_schema):
        log.warning("parameters without a description or example: %s (explain them in app/openapi.py)",
                    ", ".join(sorted(set(unknown))), extra={"parameters": sorted(set(unknown))})

