"""The realtime socket's protocol as an AsyncAPI 3.0 document, served beside the OpenAPI one at
/schema/asyncapi.json: the channel (`/api/v1/ws` and its three ways to sign in), every server event and reply
and every client frame (app/events.py), each with the JSON Schema of its payload. Payloads the REST API also
answers with (a message, a document) are the same structs' schemas; the rest are written here.
The document describes the server: it `send`s events and replies, it `receive`s the clients' frames."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from litestar import Request, Response, get

from app.access import PUBLIC
from app.consultations.lifecycle import TRANSITIONS
from app.consultations.schemas import Status
from app.events import CLIENT_FRAMES, REPLIES, STREAM_EVENTS
from app.links import public_base

ASYNCAPI_PATH = "/schema/asyncapi.json"
SOCKET_PATH = "/api/v1/ws"

_ID = {"type": "string", "format": "uuid"}
_WHEN = {"type": ["string", "null"], "format": "date-time"}
_CALL = {
    "type": "object", "required": ["call_id", "consultation_id", "conversation_id", "specialist_id", "patient_id",
                                   "state"],
    "properties": {
        "call_id": _ID, "consultation_id": _ID, "conversation_id": _ID, "specialist_id": _ID, "patient_id": _ID,
        "state": {"type": "string", "enum": ["ringing", "active", "ended"]},
        "end_reason": {"type": ["string", "null"],
                       "enum": ["completed", "declined", "missed", "cancelled", "failed", None]},
        "ring_until": _WHEN, "started_at": _WHEN, "ended_at": _WHEN,
        "accepted_by": {"type": ["string", "null"], "format": "uuid"},
    },
}
_WINDOW = {"type": "object", "required": ["conversation_id", "writable", "writable_until"],
           "properties": {"conversation_id": _ID, "writable": {"type": "boolean"}, "writable_until": _WHEN}}
_DATA: dict[str, Any] = {
    "message.new": {"$ref": "#/components/schemas/MessageOut"},
    "message.updated": {"$ref": "#/components/schemas/MessageOut"},
    "message.read": {"type": "object", "required": ["conversation_id", "user_id", "up_to_message_id"],
                     "properties": {"conversation_id": _ID, "user_id": _ID, "up_to_message_id": _ID}},
    "conversation.opened": _WINDOW, "conversation.closed": _WINDOW, "conversation.extended": _WINDOW,
    "consultation.updated": {
        "type": "object", "description": "What changed; the app reads the consultation itself over the API.",
        "required": ["consultation_id", "status", "change", "paid", "starts_at", "specialist_id", "patient_id"],
        "properties": {
            "consultation_id": _ID, "specialist_id": _ID, "patient_id": _ID, "paid": {"type": "boolean"},
            "starts_at": {"type": "string", "format": "date-time"},
            "status": {"type": "string", "enum": [s.value for s in Status]},
            "change": {"type": "string", "enum": ["booked", "paid", *TRANSITIONS]}}},
    "document.ready": {"$ref": "#/components/schemas/DocumentOut"},
    **{name: _CALL for name in ("call.incoming", "call.accepted", "call.declined", "call.ended")},
    "call.media": {"type": "object", "required": ["call_id", "user_id", "audio", "video"],
                   "properties": {"call_id": _ID, "user_id": _ID, "audio": {"type": "boolean"},
                                  "video": {"type": "boolean"}}},
    "notice": {"type": "object", "required": ["kind"], "description": "The kind and the ids it is about.",
               "properties": {"kind": {"type": "string", "enum": [
                   "low_rating", "conclusion_ready", "analysis_forwarded", "waitlist_slot_available",
                   "missed_call"]}},
               "additionalProperties": {"type": ["string", "integer"]}},
    # replies
    "pong": None,
    "rtc.answer": {"type": "object", "required": ["call_id", "sdp", "type"],
                   "properties": {"call_id": _ID, "sdp": {"type": "string"}, "type": {"const": "answer"}}},
    "error": {"type": "object", "required": ["reason"],
              "properties": {"reason": {"type": "string", "examples": [
                  "invalid_frame", "invalid_event_id", "invalid_presence_state", "unsupported_type",
                  "offer_in_progress"]}}},
    # client frames
    "ping": None,
    "resume": {"type": "object", "required": ["last_event_id"],
               "properties": {"last_event_id": {"type": "string", "pattern": "^[0-9]+$"}}},
    "presence": {"type": "object", "required": ["state"],
                 "properties": {"state": {"type": "string", "enum": ["foreground", "background"]}}},
    "rtc.offer": {"type": "object", "required": ["call_id", "sdp", "type"],
                  "properties": {"call_id": _ID, "sdp": {"type": "string"}, "type": {"const": "offer"}}},
    "rtc.candidate": {"type": "object", "required": ["call_id", "candidate"],
                      "properties": {"call_id": _ID, "candidate": {"type": ["string", "null"]}}},
}


def payload(name: str, numbered: bool) -> dict[str, Any]:
    """The frame: `{"type", "id" (stream events), "data"}`, `data` as above (absent where there is none)."""
    data = _DATA[name]
    properties: dict[str, Any] = {"type": {"const": name}}
    required = ["type"]
    if numbered:
        properties["id"] = {"type": "string", "pattern": "^[0-9]+$",
                            "description": "The event's position in the recipient's stream (resume after it)."}
        required.append("id")
    if data is not None:
        properties["data"] = data
        required.append("data")
    return {"type": "object", "required": required, "properties": properties}


@functools.cache
def _schemas() -> dict[str, Any]:
    from app.chat.schemas import MessageOut
    from app.documents.schemas import DocumentOut

    _, components = msgspec.json.schema_components([MessageOut, DocumentOut],
                                                   ref_template="#/components/schemas/{name}")
    return components


def document(base_url: str, version: str) -> dict[str, Any]:
    scheme, _, host = base_url.partition("://")
    frames = [(n, STREAM_EVENTS[n], True) for n in STREAM_EVENTS] + [(n, REPLIES[n], False) for n in REPLIES]
    incoming = [(n, CLIENT_FRAMES[n], False) for n in CLIENT_FRAMES]
    messages = {n: {"name": n, "title": n, "summary": summary, "contentType": "application/json",
                         "payload": payload(n, numbered)} for n, summary, numbered in frames + incoming}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Clinic API: the realtime socket", "version": version, "description": (
            "One WebSocket per app: the user's events (chat, consultations, documents, calls, notices) in their "
            "stream's order, each with its position `id`; `resume` after a reconnect replays what was missed, "
            "once. Sign in with a single-use ticket (`POST /api/v1/ws/ticket`: `?ticket=`), the subprotocols "
            "`bearer, <access token>`, or `?token=<access token>`. Close codes: 1009 frame too large, 4401 "
            "access revoked, 4408 no heartbeat, 4409 too many sockets (the oldest goes), 4429 too slow to read "
            "(resume on reconnect).")},
        "servers": {"api": {"host": host, "protocol": "wss" if scheme == "https" else "ws",
                            "description": "The API itself"}},
        "channels": {"socket": {
            "address": SOCKET_PATH, "servers": [{"$ref": "#/servers/api"}],
            "messages": {k: {"$ref": f"#/components/messages/{k}"} for k in messages},
            "bindings": {"ws": {"method": "GET", "query": {"type": "object", "properties": {
                "ticket": {"type": "string", "description": "A ticket from POST /api/v1/ws/ticket (once)."},
                "token": {"type": "string", "description": "An access token (older clients)."}}}}},
        }},
        "operations": {
            "sendEvents": {"action": "send", "channel": {"$ref": "#/channels/socket"},
                           "summary": "Events of the user's stream, and replies to the client's frames",
                           "messages": [{"$ref": f"#/channels/socket/messages/{n}"} for n, _, _ in frames]},
            "receiveFrames": {"action": "receive", "channel": {"$ref": "#/channels/socket"},
                              "summary": "What a client may send",
                              "messages": [{"$ref": f"#/channels/socket/messages/{n}"} for n, _, _ in incoming]},
        },
        "components": {"messages": messages, "schemas": _schemas()},
    }


@get(ASYNCAPI_PATH, opt=PUBLIC, include_in_schema=False, media_type="application/json")
async def asyncapi_document(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """The AsyncAPI document of the socket (public, like the OpenAPI one: it holds no data)."""
    return Response(document(public_base(request), request.app.openapi_config.version
                             if request.app.openapi_config else "1"))
