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
    """Appends one JSON line {"to", "text", "sent_at"} per message: the embedded profile's 'gateway'.

    One writer appends the lines waiting, in the order they were sent, with one file open and one thread hop
    per batch (no fsync): the event loop never waits on the disk, and many logins at once cost one write, not
    a thread round trip each in turn. `send` returns once its line is in the file, as a gateway's answer would.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._waiting: list[str] = []  # lines not yet handed to the writer, in send order
        self._batch: asyncio.Future[None] | None = None  # resolves when the waiting lines are written
        self._writer: asyncio.Task[None] | None = None

    async def send(self, to: str, text: str) -> None:
        line = json.dumps({"to": to, "text": text, "sent_at": dt.datetime.now(dt.UTC).isoformat()})
        loop = asyncio.get_running_loop()
        if self._writer is not None and self._writer.get_loop() is not loop:  # a new loop (tests): start over
            self._waiting, self._batch, self._writer = [], None, None
        self._waiting.append(line)
        if self._batch is None:
            self._batch = loop.create_future()
        batch = self._batch
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_all(), name="sms-log-writer")
        await asyncio.shield(batch)  # a caller that gives up does not stop the others' lines

    async def _write_all(self) -> None:
        while self._waiting:  # lines sent while a batch is written form the next batch
            lines, self._waiting = self._waiting, []
            batch, self._batch = self._batch, None
            assert batch is not None
            try:
                await asyncio.to_thread(self._append, lines)
            except asyncio.CancelledError:
                batch.cancel()
                if self._batch is not None:
                    self._batch.cancel()
                raise
            except Exception as exc:  # this batch's senders get the error; the next batch goes on
                batch.set_exception(exc)
            else:
                batch.set_result(None)

    def _append(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))  # whole lines, never interleaved

    async def aclose(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)


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
