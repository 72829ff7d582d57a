"""Pushes to phones: one interface, FCM (firebase-admin), APNs VoIP (HTTP/2), or a log file (embedded).

The outbox worker sends through `PushSender`. A push carries no personal or medical content: only
`{type, ref}` and a neutral title.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol
from uuid import UUID

from app.settings import Settings


@dataclass(frozen=True, slots=True)
class PushMessage:
    type: str  # call.incoming | message.new | reminder | notice
    ref: str  # the id the app fetches the details by, over the API
    collapse_key: str  # the same on a retry of the same push, so the phone shows it once
    urgent: bool = False  # a call: high priority, and it must never ring late (ttl within CALL_RING_SECONDS)
    ttl_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class PushTarget:
    device_id: UUID
    user_id: UUID
    platform: str  # android | ios | web
    push_token: str
    voip_token: str | None = None  # iOS: urgent pushes (calls) go to APNs VoIP with it


class Outcome(StrEnum):
    SENT = "sent"
    GONE = "gone"  # the provider says the token is dead: remove the device
    VOIP_GONE = "voip_gone"  # APNs says the VoIP token is dead: forget it, keep the device's push token
    RETRY = "retry"  # transient failure or a lost answer: send again later with the same collapse key
    FAILED = "failed"  # refused for good (not the token's fault): do not retry


class PushSender(Protocol):
    async def send(self, pushes: Sequence[tuple[PushMessage, PushTarget]]) -> list[Outcome]:
        """One outcome per push, in order. Never raises for a provider's failure."""
        ...

    async def aclose(self) -> None: ...


# The only words a push shows on a lock screen: neutral, the same for everyone (the clinic speaks Russian).
TITLES: dict[str, str] = {
    "call.incoming": "Входящий звонок из клиники",
    "message.new": "Новое сообщение из клиники",
    "reminder": "Напоминание из клиники",
    "notice": "Уведомление из клиники",
}
DEFAULT_TITLE = "Уведомление из клиники"


def title_for(message_type: str) -> str:
    return TITLES.get(message_type, DEFAULT_TITLE)


def collapse_id(key: str) -> str:
    """APNs' apns-collapse-id is at most 64 bytes: a longer key is replaced by its hash (still stable on a retry)."""
    return key if len(key.encode()) <= 64 else hashlib.sha256(key.encode()).hexdigest()


def ring_ttl(message: PushMessage, ring_seconds: int) -> int:
    """A call's push never outlives the ringing: its ttl is within CALL_RING_SECONDS."""
    return max(1, min(message.ttl_seconds or ring_seconds, ring_seconds))


def apns_configured(settings: Settings) -> bool:
    return bool(settings.apns_key_file and settings.apns_key_id and settings.apns_team_id and settings.apns_topic)


def token_hash(token: str) -> str:
    """What logs and records may hold instead of a push token (the same hash the devices table keeps)."""
    return hashlib.sha256(token.encode()).hexdigest()


class LogPush:
    """Appends one JSON line per push, holding only what would be sent: the embedded profile's 'provider'."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    @staticmethod
    def line(message: PushMessage, target: PushTarget) -> str:
        return json.dumps({
            "type": message.type,
            "ref": message.ref,
            "title": title_for(message.type),
            "urgent": message.urgent,
            "collapse_key": message.collapse_key,
            "platform": target.platform,
            "token_hash": token_hash(target.push_token),
            "sent_at": dt.datetime.now(dt.UTC).isoformat(),
        }, ensure_ascii=False)

    async def send(self, pushes: Sequence[tuple[PushMessage, PushTarget]]) -> list[Outcome]:
        if not pushes:
            return []
        text = "".join(self.line(m, t) + "\n" for m, t in pushes)
        try:
            async with self._lock:  # whole lines, never interleaved
                await asyncio.to_thread(self._append, text)
        except OSError:
            return [Outcome.RETRY] * len(pushes)
        return [Outcome.SENT] * len(pushes)

    def _append(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)

    async def aclose(self) -> None:
        return None


class RoutedPush:
    """Each push to its provider: an iPhone's call to APNs VoIP (when it has a VoIP token and APNs is configured),
    everything else to FCM (which reaches iPhones through APNs itself); the providers are sent to at once."""

    def __init__(self, fcm: PushSender, apns: PushSender | None) -> None:
        self.fcm = fcm
        self.apns = apns

    def via_apns(self, message: PushMessage, target: PushTarget) -> bool:
        return self.apns is not None and message.urgent and target.platform == "ios" and bool(target.voip_token)

    async def send(self, pushes: Sequence[tuple[PushMessage, PushTarget]]) -> list[Outcome]:
        routes: dict[bool, list[int]] = {False: [], True: []}
        for i, (message, target) in enumerate(pushes):
            routes[self.via_apns(message, target)].append(i)
        senders = {False: self.fcm, True: self.apns}
        jobs = [(positions, sender.send([pushes[i] for i in positions]))
                for apns, positions in routes.items() if positions and (sender := senders[apns]) is not None]
        answers = await asyncio.gather(*(job for _, job in jobs))
        outcomes = [Outcome.FAILED] * len(pushes)
        for (positions, _), answer in zip(jobs, answers, strict=True):
            for i, outcome in zip(positions, answer, strict=True):
                outcomes[i] = outcome
        return outcomes

    async def aclose(self) -> None:
        await self.fcm.aclose()
        if self.apns is not None:
            await self.apns.aclose()


def push_sender(settings: Settings) -> PushSender:
    """FCM when configured (with APNs VoIP for iOS calls when that is configured too); neither: the log file."""
    # imported only when configured: they import this module, and firebase-admin takes seconds to import
    fcm_sender: PushSender
    if settings.fcm_credentials:
        from app.notifications.fcm import FcmPush
        fcm_sender = FcmPush(settings)
    else:
        fcm_sender = LogPush(settings.resolved_push_log_path)
    if not apns_configured(settings):
        return fcm_sender
    from app.notifications.apns import ApnsVoip
    return RoutedPush(fcm_sender, ApnsVoip(settings))
