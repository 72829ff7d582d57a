"""Sending SMS: one interface, a log-file backend (embedded) and an HTTP gateway backend."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import httpx

from app.errors import Unavailable
from app.settings import Settings

log = logging.getLogger("app.sms")


class SmsSender(Protocol):
    async def send(self, to: str, text: str) -> None: ...

    async def aclose(self) -> None: ...


class LogSms:
    """Appends one JSON line {"to", "text", "sent_at"} per message: the embedded profile's 'gateway'."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def send(self, to: str, text: str) -> None:
        line = json.dumps({"to": to, "text": text, "sent_at": dt.datetime.now(dt.UTC).isoformat()})
        async with self._lock:  # whole lines, never interleaved
            await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    async def aclose(self) -> None:
        return None


class HttpSms:
    """A gateway reached by an HTTP POST whose JSON body comes from a template with {to} and {text}."""

    def __init__(self, settings: Settings) -> None:
        if not settings.sms_http_url:
            raise ValueError("SMS_BACKEND=http needs SMS_HTTP_URL")
        self.url = settings.sms_http_url
        self.template = json.loads(settings.sms_http_template)
        self.retries = max(1, settings.sms_http_retries)
        headers = {"Content-Type": "application/json"}
        if settings.sms_http_token:
            headers["Authorization"] = f"Bearer {settings.sms_http_token}"
        elif settings.sms_http_user:
            pair = f"{settings.sms_http_user}:{settings.sms_http_password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self._client = httpx.AsyncClient(timeout=settings.sms_http_timeout_seconds, headers=headers)

    def body(self, to: str, text: str) -> Any:
        def fill(node: Any) -> Any:
            if isinstance(node, str):
                return node.replace("{to}", to).replace("{text}", text)
            if isinstance(node, dict):
                return {k: fill(v) for k, v in node.items()}
            if isinstance(node, list):
                return [fill(v) for v in node]
            return node

        return fill(self.template)

    async def send(self, to: str, text: str) -> None:
        payload = self.body(to, text)
        for attempt in range(1, self.retries + 1):
            try:
                response = await self._client.post(self.url, json=payload)
                if response.status_code < 500:
                    if response.is_error:  # the gateway refused this message; retrying will not help
                        log.error("sms gateway refused", extra={"status": response.status_code})
                        raise Unavailable("the SMS gateway refused the message", "sms_failed")
                    return
            except httpx.TransportError:
                log.warning("sms gateway unreachable", extra={"attempt": attempt})
            if attempt < self.retries:
                await asyncio.sleep(0.2 * 2 ** (attempt - 1))
        raise Unavailable("the SMS gateway is unavailable", "sms_unavailable")

    async def aclose(self) -> None:
        await self._client.aclose()


def sms_sender(settings: Settings) -> SmsSender:
    if settings.sms_backend == "http":
        return HttpSms(settings)
    if settings.sms_backend == "log":
        return LogSms(settings.resolved_sms_log_path)
    raise ValueError(f"unknown SMS_BACKEND {settings.sms_backend!r}: use log or http")
