"""An SFU node (`python -m app sfu`): the forwarding engine behind a small HTTP control interface, registered in
Redis with its load every `SFU_HEARTBEAT_SECONDS`.

Control interface (every request carries `Authorization: Bearer <SFU_SECRET>`, else 401):
- `POST /rooms/{room_id}/participants/{participant_id}/offer` `{"sdp", "type": "offer"}` → 200
  `{"sdp", "type": "answer"}`; 409 `{"reason": "room_full"}` for a third participant.
- `POST /rooms/{room_id}/participants/{participant_id}/candidates` `{"candidate": "<SDP line>" | null}` → 204: a
  trickled ICE candidate of the participant's current connection (null: no more); 422 `invalid_candidate`.
- `DELETE /rooms/{room_id}` → 204 (idempotent).
- `GET /health` → `{"node", "rooms", "participants", "streams"}`.
- `GET /metrics` → Prometheus text (app/rtc/sfu/metrics.py): the one route that does not take the SFU secret (a
  scraper never holds it) but `Authorization: Bearer <METRICS_TOKEN>` when that is set, like METRICS_ADDRESS.
Errors answer `{"reason", "detail"}`.

Litestar on uvicorn, like the API: the interface is used a few times per call (offers, a close; health probes
only without Redis), so a bare asyncio server would save nothing that counts. Measured on the two-core test
machine under load: an idle node costs 0.13 % of a core, a request about 1 ms of CPU, against the 1-2 % of a
core each forwarded stream costs continuously.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import uvicorn
from litestar import Litestar, Request, Response, delete, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import DomainError, Invalid, NotAuthenticated
from app.observability import configure_logging, metrics_allowed, metrics_text
from app.rtc.placement import AnswerBody, CandidateBody, NodeStatus, OfferBody, deregister, register
from app.rtc.sfu.engine import Sfu
from app.rtc.sfu.metrics import SFU_METRICS
from app.settings import Settings
from app.tasks import cancel_until_done

log = logging.getLogger("app.rtc.sfu.node")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # room and participant ids: the API's UUIDs, a benchmark's names
MAX_BODY_BYTES = 256 * 1024  # an offer's SDP is a few KB
STOP_STEP_SECONDS = 10.0  # each step of a node's shutdown at most


def public_url(settings: Settings) -> str:
    """What the node registers: the address the API lists in SFU_URLS."""
    if settings.sfu_public_url:
        return settings.sfu_public_url.rstrip("/")
    if listen_address(settings)[0] in ("0.0.0.0", "::"):  # noqa: S104  (no one reaches a node at that address)
        raise ValueError("an SFU node listening on every interface needs SFU_PUBLIC_URL (the address in SFU_URLS)")
    return f"http://{settings.sfu_listen}"


def listen_address(settings: Settings) -> tuple[str, int]:
    host, sep, port = settings.sfu_listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"SFU_LISTEN must be host:port, not {settings.sfu_listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _checked_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise Invalid(f"the {what} id is not valid", reason="invalid_id")
    return value


@post("/rooms/{room_id:str}/participants/{participant_id:str}/offer", status_code=200)
async def offer(room_id: FromPath[str], participant_id: FromPath[str], data: JSONBody[OfferBody],
                request: Request[Any, Any, Any]) -> AnswerBody:
    if data.type != "offer":
        raise Invalid('only an offer ("type": "offer") is answered', reason="not_an_offer")
    sfu: Sfu = request.app.state.sfu
    try:
        sdp, type_ = await sfu.offer(_checked_id(room_id, "room"), _checked_id(participant_id, "participant"),
                                     data.sdp, data.type)
    except ValueError as exc:  # aiortc's word for SDP it cannot read or negotiate
        raise Invalid(f"the offer cannot be answered: {exc}", reason="invalid_offer") from exc
    return AnswerBody(sdp=sdp, type=type_)


@post("/rooms/{room_id:str}/participants/{participant_id:str}/candidates", status_code=204)
async def candidate(room_id: FromPath[str], participant_id: FromPath[str], data: JSONBody[CandidateBody],
                    request: Request[Any, Any, Any]) -> None:
    if data.candidate is not None and len(data.candidate) > 1024:  # one SDP line is a few hundred bytes
        raise Invalid("the ICE candidate is too long", reason="invalid_candidate")
    sfu: Sfu = request.app.state.sfu
    await sfu.candidate(_checked_id(room_id, "room"), _checked_id(participant_id, "participant"), data.candidate)


@delete("/rooms/{room_id:str}")
async def close_room(room_id: FromPath[str], request: Request[Any, Any, Any]) -> None:
    sfu: Sfu = request.app.state.sfu
    await sfu.close_room(_checked_id(room_id, "room"))


@get("/health")
async def health(request: Request[Any, Any, Any]) -> NodeStatus:
    node: Node = request.app.state.node
    return node.status()


@get("/metrics", opt={"metrics": True}, media_type="text/plain; version=0.0.4")
async def metrics() -> Response[bytes]:
    return Response(metrics_text(), media_type="text/plain; version=0.0.4")


def _refusal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    if isinstance(exc, DomainError):
        code, reason, detail = exc.status_code, str(exc.extra["reason"]), exc.detail
    elif isinstance(exc, ValidationException):
        code, reason, detail = 422, "invalid_input", "the body must be {\"sdp\": str, \"type\": \"offer\"}"
    elif isinstance(exc, HTTPException):
        code, reason, detail = exc.status_code, "refused", exc.detail
        if code == 404:
            reason = "not_found"
    else:
        log.error("control request failed", exc_info=exc, extra={"path": request.url.path})
        code, reason, detail = 500, "internal_error", "internal error"
    return Response({"reason": reason, "detail": detail}, status_code=code)


class Node:
    """One node: its engine, its name and its registration."""

    def __init__(self, settings: Settings, sfu: Sfu | None = None) -> None:
        if not settings.sfu_secret:
            raise ValueError("an SFU node needs SFU_SECRET (the API's control requests carry it)")
        self.settings = settings
        self.url = public_url(settings)
        # another process on the same address is another node: the rooms of the one before are gone
        self.name = f"{self.url}#{secrets.token_hex(4)}"
        self.expected = _digest(f"Bearer {settings.sfu_secret}")
        self.sfu = sfu if sfu is not None else Sfu(settings)
        self.owns_sfu = sfu is None
        self.redis: Redis | None = None
        self.beating: asyncio.Task[None] | None = None
        SFU_METRICS.watch(self.sfu, self.name)

    def status(self) -> NodeStatus:
        load = self.sfu.load()
        return NodeStatus(node=self.name, rooms=load.rooms, participants=load.participants, streams=load.streams)

    def authorize(self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        """Litestar guard: the shared secret, compared in constant time (digests, so not even its length shows);
        for the metrics, METRICS_TOKEN when set."""
        if handler.opt.get("metrics"):
            if not metrics_allowed(connection.headers.get("authorization", ""), self.settings.metrics_token):
                raise NotAuthenticated("the metrics need METRICS_TOKEN")
            return
        if not hmac.compare_digest(_digest(connection.headers.get("authorization", "")), self.expected):
            raise NotAuthenticated("this control interface needs the SFU secret")

    async def beat(self) -> None:
        """Write this node's load under its URL for HEARTBEAT_LIVES heartbeats, and clear the placements the
        API counted since the last one (they are in the load now, or never came)."""
        if self.redis is None:  # no registry: the API asks the node itself
            return
        await register(self.redis, self.name, msgspec.json.encode(self.status()), self.settings.sfu_heartbeat_seconds)

    async def keep_beating(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sfu_heartbeat_seconds)
            try:
                await self.beat()
            except (RedisError, OSError) as exc:  # the node keeps forwarding; the API may consider it dead
                log.warning("SFU heartbeat failed", extra={"error": repr(exc)})
            except Exception:  # whatever it was, the next heartbeat tries again: a node never stops beating
                log.exception("SFU heartbeat failed")

    async def start(self) -> None:
        if self.settings.redis_url:
            self.redis = Redis.from_url(self.settings.redis_url, socket_timeout=self.settings.redis_timeout_seconds,
                                        socket_connect_timeout=self.settings.redis_timeout_seconds)
            try:  # registered before the first request can come
                await self.beat()
            except (RedisError, OSError) as exc:
                log.warning("SFU registration failed at start; retrying", extra={"error": repr(exc)})
            self.beating = asyncio.create_task(self.keep_beating())
        log.info("SFU node started", extra={"node": self.name, "registry": self.redis is not None})

    async def stop(self) -> None:
        """Deregister first (no more rooms placed here), then close every room."""
        if self.beating is not None:
            await cancel_until_done(self.beating)  # a Redis call can swallow one cancel (app/tasks.py)
        if self.redis is not None:
            try:
                # only this process's registration: a successor on the same address may have written its own
                await asyncio.wait_for(deregister(self.redis, self.name), STOP_STEP_SECONDS)
            except (RedisError, OSError, TimeoutError, msgspec.DecodeError) as exc:  # it expires by itself
                log.warning("SFU deregistration failed", extra={"error": repr(exc)})
        if self.owns_sfu:
            try:
                await asyncio.wait_for(self.sfu.close(), STOP_STEP_SECONDS)
            except TimeoutError:
                log.error("closing the SFU's rooms did not end in time")
        if self.redis is not None:
            await self.redis.aclose()
        SFU_METRICS.unwatch(self.sfu)
        log.info("SFU node stopped", extra={"node": self.name})


def create_node_app(settings: Settings, sfu: Sfu | None = None) -> Litestar:
    """The control interface of one node (`sfu`: an engine to serve, closed by its owner; None: the node's own)."""
    node = Node(settings, sfu)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await node.start()
        try:
            yield
        finally:
            await node.stop()

    app = Litestar(route_handlers=[offer, candidate, close_room, health, metrics], guards=[node.authorize],
                   lifespan=[lifespan], exception_handlers={Exception: _refusal}, request_max_body_size=MAX_BODY_BYTES,
                   openapi_config=None, logging_config=None, debug=False)
    app.state.node = node
    app.state.sfu = node.sfu
    return app


def run_node(settings: Settings) -> int:
    """Serve one node until SIGTERM or SIGINT (then deregister and close its rooms)."""
    if not settings.sfu_secret:
        print("an SFU node needs SFU_SECRET (the API's control requests carry it)", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        host, port = listen_address(settings)
        app = create_node_app(settings)
    except ValueError as exc:  # SFU_LISTEN or SFU_PUBLIC_URL
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"SFU node {public_url(settings)} listening on {host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                proxy_headers=False, timeout_graceful_shutdown=5)
    return 0
