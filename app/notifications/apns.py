"""APNs VoIP pushes (PushKit: an iPhone rings for a call) straight over HTTP/2: firebase-admin cannot send them.

One HTTP/2 connection, reused for every push; a provider token (ES256 JWT) reused for under an hour, as Apple
asks (a fresh token per request is refused as TooManyProviderTokenUpdates).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import jwt

from app.notifications.push import Outcome, PushMessage, PushTarget, collapse_id, ring_ttl
from app.settings import Settings

log = logging.getLogger("app.push")

TOKEN_REFRESH_SECONDS = 50 * 60  # Apple refuses a token older than an hour, and one refreshed more often than 20 min
GONE_REASONS = frozenset({"Unregistered", "BadDeviceToken", "DeviceTokenNotForTopic"})
STALE_TOKEN_REASONS = frozenset({"ExpiredProviderToken", "InvalidProviderToken"})


class ApnsVoip:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        key_file, key_id, team_id, topic = (settings.apns_key_file, settings.apns_key_id, settings.apns_team_id,
                                            settings.apns_topic)
        if not key_file or not key_id or not team_id or not topic:
            raise ValueError("APNs needs APNS_KEY_FILE, APNS_KEY_ID, APNS_TEAM_ID and APNS_TOPIC")
        self.key = Path(key_file).read_bytes()  # once, at start
        self.key_id = key_id
        self.team_id = team_id
        self.topic = f"{topic}.voip"
        self.ring_seconds = settings.call_ring_seconds
        self.clock = clock
        self._token: str | None = None
        self._token_at = 0.0
        trust = ssl.create_default_context(cafile=settings.apns_ca_file)  # None: the system store
        self._client = httpx.AsyncClient(http2=True, verify=trust, base_url=settings.apns_endpoint.rstrip("/"),
                                         timeout=settings.apns_timeout_seconds)

    def provider_token(self) -> str:
        now = self.clock()
        if self._token is None or now - self._token_at >= TOKEN_REFRESH_SECONDS:
            self._token = jwt.encode({"iss": self.team_id, "iat": int(now)}, self.key, algorithm="ES256",
                                     headers={"kid": self.key_id})
            self._token_at = now
        return self._token

    def request(self, message: PushMessage, target: PushTarget) -> tuple[str, dict[str, str], bytes]:
        """Path, headers and body of a VoIP push: {type, ref} and nothing else, never ringing past the ring window."""
        ttl = ring_ttl(message, self.ring_seconds)
        headers = {
            "apns-push-type": "voip",
            "apns-topic": self.topic,
            "apns-expiration": str(int(self.clock()) + ttl),
            "apns-priority": "10",
            "apns-collapse-id": collapse_id(message.collapse_key),
            "authorization": f"bearer {self.provider_token()}",
        }
        body = json.dumps({"aps": {}, "type": message.type, "ref": message.ref}).encode()
        return f"/3/device/{target.voip_token}", headers, body

    async def _send_one(self, message: PushMessage, target: PushTarget) -> Outcome:
        if not target.voip_token:
            return Outcome.FAILED
        path, headers, body = self.request(message, target)
        try:
            response = await self._client.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:  # transport trouble or a timeout: the answer is lost, send again
            log.warning("apns unreachable", extra={"error": repr(exc)})
            return Outcome.RETRY
        if response.status_code == 200:
            return Outcome.SENT
        reason = _reason(response)
        if response.status_code == 410 or reason in GONE_REASONS:
            return Outcome.VOIP_GONE  # only the VoIP token: the device's FCM token may well be alive
        if reason in STALE_TOKEN_REASONS:
            self._token = None  # sign a fresh one for the retry
            outcome = Outcome.RETRY
        elif response.status_code == 429 or response.status_code >= 500:
            outcome = Outcome.RETRY
        else:
            outcome = Outcome.FAILED
        log.warning("apns push not sent", extra={"status": response.status_code, "reason": reason,
                                                 "outcome": outcome.value})
        return outcome

    async def send(self, pushes: Sequence[tuple[PushMessage, PushTarget]]) -> list[Outcome]:
        # concurrent streams on the one connection
        return list(await asyncio.gather(*(self._guarded(m, t) for m, t in pushes)))

    async def _guarded(self, message: PushMessage, target: PushTarget) -> Outcome:
        try:
            return await self._send_one(message, target)
        except Exception:  # e.g. an unreadable key: never raise for a push
            log.exception("apns push failed")
            return Outcome.FAILED

    async def aclose(self) -> None:
        await self._client.aclose()


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("reason", ""))
    except ValueError:
        return ""
