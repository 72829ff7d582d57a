"""create_app(settings): the one place the service is assembled."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotFoundException
from litestar.middleware import DefineMiddleware
from redis.asyncio import BlockingConnectionPool, Redis

from app import outbox
from app.access import PUBLIC
from app.accounts.controllers import (
    AuthController,
    DeviceController,
    MeController,
    PatientController,
    StaffController,
)
from app.accounts.tokens import TokenIssuer
from app.asyncapi import asyncapi_document
from app.audit.controllers import AuditController
from app.audit.service import AuditLog
from app.auth import InProcessTickets, RedisTickets, TokenAuthMiddleware
from app.body_timeouts import body_timeouts
from app.cabinet.page import CABINET_ROUTES
from app.chat.controllers import ChatController
from app.chat.gateway import realtime, socket_ticket
from app.chat.hub import Bus, Hub, InProcessBus, InProcessPresence, RedisBus, RedisPresence
from app.chat.sending import SendQueue
from app.chat.service import SendRules
from app.clientaddr import trusted_networks
from app.consultations.controllers import CareController, ConsultationController
from app.db import Database, provide_db_session
from app.documents.controllers import DocumentController, InboxController, list_documents
from app.documents.storage import STORE_ERRORS, object_store
from app.documents.upload_controllers import FILE_ROUTES, upload_routes
from app.documents.uploads import keep_pending_clean
from app.errors import DomainError, error_response
from app.fhir.controllers import fhir_router
from app.health import HealthController
from app.limits import InProcessLimiter, RedisLimiter
from app.notifications.controllers import OutboxController
from app.notifications.push import push_sender
from app.notifications.sms import sms_sender
from app.notifications.worker import OutboxWorker, RedisNudge
from app.observability import (
    configure_logging,
    metrics_allowed,
    metrics_text,
    request_id_middleware,
    serve_metrics,
    where_tasks_wait,
)
from app.openapi import assets_router, openapi_config
from app.openapi import on_startup as document_openapi
from app.payments.controllers import PaymentController
from app.payments.service import RefundWorker, provider_from
from app.revocation import LocalRevocationBus, RedisRevocationBus, close_sockets
from app.rtc.controllers import SOCKET_HANDLERS, CallController, StartController, list_ice_servers
from app.rtc.page import PAGE_ROUTES
from app.rtc.placement import node_urls, sfu_directory
from app.rtc.service import CallKeeper
from app.rtc.sfu.engine import Sfu
from app.scheduling.controllers import CatalogueController
from app.scheduling.service import FeedCache, RulesCache, SchedulingService
from app.services import calls_for
from app.settings import Settings, settings_from_env
from app.tasks import cancel_until_done
from app.timeparams import set_answer_zone
from app.tracing import tracing_of

log = logging.getLogger("app")
SERVICE_PATHS = ["^/health", "^/metrics", "^/schema"]
SHUTDOWN_STEP_SECONDS = 15.0  # each shutdown step's most; a healthy one takes milliseconds


@get("/metrics", include_in_schema=False, opt=PUBLIC, media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Only for the scraper holding METRICS_TOKEN; without one set, not on the API port at all."""
    expected = request.app.state.settings.metrics_token
    if not expected or not metrics_allowed(request.headers.get("authorization", ""), expected):
        raise NotFoundException()  # 404 either way: the route does not admit it exists
    return Response(metrics_text(), media_type="text/plain; version=0.0.4")


async def keep_slot_horizons(database: Database, settings: Settings) -> None:
    """As days pass, extend every schedule's slots to its horizon (at start, then periodically)."""
    while True:
        try:
            async with database.writer() as session:
                created = await SchedulingService(session, settings).extend_horizons()
            if created:
                log.info("slot horizons extended", extra={"slots_created": created})
        except Exception:  # a passing database hiccup must not end the loop
            log.exception("extending slot horizons failed")
        await asyncio.sleep(settings.slot_refresh_seconds)


async def bounded(step: str, awaitable: Awaitable[Any], seconds: float = SHUTDOWN_STEP_SECONDS) -> None:
    """One step of the shutdown, given a while: a step that hangs is logged and left, so a stopping process
    always ends and the steps after it still run."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        log.error("a shutdown step did not end in time",
                  extra={"step": step, "seconds": seconds, "tasks": where_tasks_wait()})
        task.cancel()
    elif not task.cancelled() and task.exception() is not None:
        log.warning("a shutdown step failed", extra={"step": step, "error": repr(task.exception())})


def create_app(settings: Settings) -> Litestar:
    configure_logging(settings.log_level)
    database = Database(settings)
    tokens = TokenIssuer(settings)  # fails fast on malformed JWT_KEYS
    trusted_networks(settings.trusted_proxies)  # and on a malformed TRUSTED_PROXIES
    tracing = tracing_of(settings)

    @asynccontextmanager
    async def backing_services(app: Litestar) -> AsyncIterator[None]:
        # a blocking pool: at a peak, callers wait for a connection instead of failing; a Redis that stops
        # answering fails commands after a while instead of hanging them (pub/sub reads still wait for events)
        redis = Redis(connection_pool=BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_pool_size, timeout=settings.redis_timeout_seconds,
            socket_timeout=settings.redis_timeout_seconds, socket_connect_timeout=settings.redis_timeout_seconds,
        )) if settings.redis_url else None
        presence_ttl = settings.ws_heartbeat_seconds * 2
        store = object_store(settings)
        hub = Hub()
        bus: Bus = RedisBus(redis) if redis is not None else InProcessBus()
        revocations = tokens.revocations  # logouts, deactivations, role changes: heard from every instance
        revocations.bus = (RedisRevocationBus(redis, settings.revocation_poll_seconds) if redis is not None
                           else LocalRevocationBus(settings.revocation_poll_seconds))
        revocations.on_revocation(close_sockets(hub))
        sms = sms_sender(settings)
        payment_provider = provider_from(settings)
        refunds = RefundWorker(database, settings, payment_provider)
        audit = AuditLog(database, enabled=settings.audit_enabled, flush_seconds=settings.audit_flush_seconds,
                         batch_rows=settings.audit_batch_rows, max_pending=settings.audit_max_pending)
        if not settings.audit_enabled:
            log.warning("AUDIT_ENABLED is off: staff reads of medical data are not audited")
        app.state.update(
            payment_provider=payment_provider, refunds=refunds, audit=audit,
            settings=settings, tokens=tokens, redis=redis, store=store, sms=sms, database=database,
            engine=database.engine,
            limiter=RedisLimiter(redis) if redis is not None else InProcessLimiter(),
            slot_feed_cache=FeedCache(settings.slot_feed_cache_seconds, {}),
            specialty_rules_cache=RulesCache(settings.specialty_rules_cache_seconds),
            hub=hub, bus=bus,
            tickets=RedisTickets(redis, settings.ws_ticket_seconds) if redis is not None
            else InProcessTickets(settings.ws_ticket_seconds),
            presence=RedisPresence(redis, presence_ttl) if redis is not None else InProcessPresence(presence_ttl),
        )
        try:  # the bucket (or directory) is made when missing
            await store.start()
        except STORE_ERRORS:  # readiness reports it; the service still starts
            log.warning("object storage unreachable at start")
        # what exists after start-up lives as long as the process: keep it out of every GC pass, and collect
        # less often, so a busy server does not pause to re-scan it (long pauses are p99 latency)
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        horizons = asyncio.create_task(keep_slot_horizons(database, settings))
        listener = asyncio.create_task(bus.run(hub.deliver))
        revocations_known = asyncio.Event()
        hearing = asyncio.create_task(revocations.bus.run(revocations, database, revocations_known))
        forgetting = asyncio.create_task(revocations.keep_table_small(database))
        try:  # a (re)started instance knows the recent revocations before it serves a token
            await asyncio.wait_for(revocations_known.wait(), settings.redis_timeout_seconds * 2)
        except TimeoutError:
            log.warning("recent revocations not loaded at start; still trying")
        # the chat commits its pushes' outbox rows over a raw connection: the queue wakes the outbox workers
        # after a group that staged some (most groups stage none: every recipient has a socket in the foreground)
        sends = SendQueue(database, SendRules(settings, app.state.limiter, app.state.presence),
                          bus, settings.chat_send_writers,
                          timeout=settings.chat_write_timeout_seconds)
        app.state.sends = sends
        writers = asyncio.create_task(sends.run())
        metrics_listener = (await serve_metrics(settings.metrics_address, settings.metrics_token)
                            if settings.metrics_address else None)
        refunding = asyncio.create_task(refunds.run())
        sweeping = asyncio.create_task(keep_pending_clean(database, store, settings))  # uploads never completed
        # outbox commits wake the workers of other processes too (`python -m app worker`, other API instances)
        stop_nudging = outbox.on_commit(RedisNudge(redis)) if redis is not None else (lambda: None)
        pushes = push_sender(settings)
        app.state.push = pushes
        worker = OutboxWorker(database, settings, pushes, sms, app.state.presence, redis)
        app.state.outbox_worker = worker
        # the embedded profile has no other process to send its pushes: the worker always runs in it
        in_api = settings.outbox_worker_in_api or settings.resolved_database_url.startswith("sqlite")
        delivering = asyncio.create_task(worker.run()) if in_api else None
        # calls: the SFU inside this process unless SFU_URLS names nodes; the keeper ends missed and failed calls
        local_sfu = None if node_urls(settings) else Sfu(settings)
        directory = sfu_directory(settings, redis, local_sfu)
        keeper = CallKeeper(database, settings, directory, bus, lambda session: calls_for(session, app.state))
        app.state.update(sfu=local_sfu, sfu_directory=directory, call_keeper=keeper,
                         socket_handlers=SOCKET_HANDLERS)  # rtc.offer on the realtime socket
        keeping = asyncio.create_task(keeper.run())
        audit.start()
        try:
            yield
        finally:
            if metrics_listener is not None:
                metrics_listener.close()
            await bounded("chat sends", cancel_until_done(writers))  # the sends in flight are answered first
            stop_nudging()
            keeper.stop()  # ends its loops after the pass under way, which may be ending a call
            await bounded("call keeper", keeping)
            background = (horizons, listener, hearing, forgetting, refunding, sweeping,
                          *([delivering] if delivering is not None else []))
            # each ends (a refund in flight is recorded, a session rolls back) before the database goes: a task
            # left mid-query would wait forever on a connection closed under it
            await bounded("background tasks", asyncio.gather(*(cancel_until_done(t) for t in background)))
            await bounded("audit log", audit.close())  # the reads audited so far are written before the database goes
            if payment_provider is not None:
                await bounded("payment provider", payment_provider.aclose())
            await bounded("sms", sms.aclose())
            await bounded("push", pushes.aclose())
            await bounded("sfu directory", directory.aclose())
            if local_sfu is not None:  # every room's peer connections, tasks and ports
                await bounded("sfu", local_sfu.close())
            await bounded("object store", store.close())
            await bounded("database", database.dispose())
            if redis is not None:
                await bounded("redis", redis.aclose())
            if tracing is not None:  # the exporter flushes with blocking I/O
                await bounded("tracing", asyncio.to_thread(tracing.close))

    return Litestar(
        plugins=[tracing.plugin] if tracing else [],  # a span around each request, outermost
        route_handlers=[HealthController, metrics, AuthController, MeController, StaffController,
                        PatientController, DeviceController, CatalogueController, ConsultationController,
                        CareController, PaymentController, ChatController, AuditController, DocumentController,
                        InboxController, OutboxController, realtime, socket_ticket,
                        StartController, CallController, list_ice_servers,
                        *PAGE_ROUTES,  # the browser call client (public: it holds no data)
                        *CABINET_ROUTES,  # the web cabinet, which loads the call client (public too)
                        *upload_routes(settings),
                        list_documents,  # after the uploads' controller on its path (one OPTIONS handler)
                        fhir_router,  # the FHIR R4 read API (app/fhir)
                        asyncapi_document,  # the socket's protocol, beside the OpenAPI document
                        assets_router()],
        dependencies={"db_session": Provide(provide_db_session)},
        lifespan=[backing_services],
        middleware=[
            request_id_middleware(settings.log_requests),
            body_timeouts(settings.body_idle_seconds, settings.body_seconds, FILE_ROUTES),
            DefineMiddleware(TokenAuthMiddleware, exclude=SERVICE_PATHS),
        ],
        exception_handlers={DomainError: error_response, HTTPException: error_response,
                            Exception: error_response},
        before_request=set_answer_zone,  # answers' times in the caller's zone (app/timeparams.py)
        request_max_body_size=settings.max_body_bytes,  # 413 as soon as a body grows past it, never read whole
        openapi_config=openapi_config(),
        on_startup=[document_openapi],
        logging_config=None,  # our JSON logging, configured above
        debug=False,
    )


def app_from_env() -> Litestar:
    """The uvicorn factory: settings from the environment."""
    return create_app(settings_from_env())
