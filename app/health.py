"""Liveness, and readiness of every backing service (database, Redis or the in-process bus, object storage)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.access import PUBLIC

CHECK_TIMEOUT = 3.0


async def _database(state: State) -> None:
    engine: AsyncEngine = state.engine
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _bus(state: State) -> None:
    if state.redis is not None:
        await state.redis.ping()


async def _storage(state: State) -> None:
    await state.store.check()


CHECKS = {"database": _database, "redis": _bus, "storage": _storage}


class HealthController(Controller):
    path = "/health"
    tags = ["service"]
    include_in_schema = True

    @get("/live", opt=PUBLIC)
    async def live(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready", opt=PUBLIC)
    async def ready(self, state: State) -> Response[dict[str, Any]]:
        async def run(check: Any) -> str:
            try:
                await asyncio.wait_for(check(state), CHECK_TIMEOUT)
            except Exception as exc:  # any failure means not ready; the body says which and why
                return f"failed: {type(exc).__name__}"
            return "ok"

        results = dict(zip(CHECKS, await asyncio.gather(*(run(c) for c in CHECKS.values())), strict=True))
        if state.redis is None:
            results["redis"] = "ok (in-process bus)"
        failed = [name for name, result in results.items() if not result.startswith("ok")]
        if failed:
            return Response({"status_code": 503, "detail": "not ready",
                             "extra": {"reason": "dependency_unavailable", "failed": failed, "checks": results}},
                            status_code=503)
        return Response({"status": "ready", "checks": results})
