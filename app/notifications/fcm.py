"""Pushes through FCM with firebase-admin's real send path (`messaging.send_each_async`).

firebase-admin has no endpoint setting for messaging: the send URL and the HTTP client are set on its messaging
service, private API of the pinned version (pyproject.toml); tests/integration/test_push_fcm.py fails loudly when
that seam moves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import firebase_admin
import google.auth.exceptions
import google.auth.transport.requests
import httpx
import requests
from firebase_admin import _http_client, _retry, credentials, exceptions, messaging

from app.notifications.push import Outcome, PushMessage, PushTarget, collapse_id, ring_ttl, title_for
from app.settings import Settings

log = logging.getLogger("app.push")

MAX_BATCH = 500  # send_each_async refuses more
# errors worth sending again later (same collapse key): the provider or the way to it is in trouble
RETRY_CODES = frozenset({exceptions.UNAVAILABLE, exceptions.INTERNAL, exceptions.RESOURCE_EXHAUSTED,
                         exceptions.DEADLINE_EXCEEDED, exceptions.UNAUTHENTICATED, exceptions.ABORTED,
                         exceptions.CANCELLED})


def fcm_message(message: PushMessage, target: PushTarget, ring_seconds: int) -> messaging.Message:
    """data {type, ref} only; a call is a high-priority data message, anything else a neutral notification."""
    data = {"type": message.type, "ref": message.ref}
    apns_headers = {"apns-collapse-id": collapse_id(message.collapse_key)}
    notification = None
    apns_payload = None
    if message.urgent:
        ttl = ring_ttl(message, ring_seconds)
        android = messaging.AndroidConfig(priority="high", ttl=ttl, collapse_key=message.collapse_key)
        apns_headers |= {"apns-priority": "10", "apns-expiration": str(int(dt.datetime.now(dt.UTC).timestamp()) + ttl)}
        if target.platform == "ios":  # an iPhone without a VoIP route: a data-only push would not wake the app
            apns_headers["apns-push-type"] = "alert"
            apns_payload = messaging.APNSPayload(aps=messaging.Aps(
                alert=messaging.ApsAlert(title=title_for(message.type)), sound="default"))
    else:
        notification = messaging.Notification(title=title_for(message.type))
        android = messaging.AndroidConfig(collapse_key=message.collapse_key, ttl=message.ttl_seconds)
    with warnings.catch_warnings():  # 7.7 prefers `fid`; devices register FCM registration tokens
        warnings.simplefilter("ignore", DeprecationWarning)
        return messaging.Message(data=data, notification=notification, android=android,
                                 apns=messaging.APNSConfig(headers=apns_headers, payload=apns_payload),
                                 token=target.push_token)


def _about_token(error: exceptions.FirebaseError) -> bool:
    """An INVALID_ARGUMENT that names the registration token (rather than the payload)."""
    response = error.http_response
    try:
        body: Any = response.json() if response is not None else {}
    except ValueError:
        body = {}
    for detail in (body.get("error") or {}).get("details") or []:
        for violation in detail.get("fieldViolations") or []:
            if "token" in str(violation.get("field", "")):
                return True
    return "registration token" in str(error).lower()


def outcome_of(error: BaseException) -> Outcome:
    if isinstance(error, messaging.UnregisteredError | messaging.SenderIdMismatchError):
        return Outcome.GONE
    if isinstance(error, exceptions.FirebaseError):
        if error.code == exceptions.INVALID_ARGUMENT:
            return Outcome.GONE if _about_token(error) else Outcome.FAILED
        if error.code in RETRY_CODES:
            return Outcome.RETRY
    return Outcome.RETRY if _transient(error) else Outcome.FAILED


def _transient(error: BaseException | None) -> bool:
    if isinstance(error, exceptions.FirebaseError):
        response = error.http_response
        return (response is not None and response.status_code >= 500) or _transient(error.cause)
    return isinstance(error, httpx.TransportError | requests.RequestException | google.auth.exceptions.TransportError
                      | TimeoutError | OSError)


def point_at(app: firebase_admin.App, endpoint: str, project_id: str, timeout: float) -> Any:
    """The seam: the messaging service's send URL at `endpoint`, and its HTTP client without retries of its own
    (the outbox retries, with the same collapse key, and a held or lost answer is one attempt)."""
    service = messaging._get_messaging_service(app)
    service._fcm_url = f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"
    service._async_client = _http_client.HttpxAsyncClient(
        credential=service._credential, timeout=timeout,
        retry_config=_retry.HttpxRetry(max_retries=0))
    return service


class FcmPush:
    """FCM HTTP v1 through firebase-admin; one named firebase app per sender."""

    def __init__(self, settings: Settings) -> None:
        if not settings.fcm_credentials:
            raise ValueError("FcmPush needs FCM_CREDENTIALS")
        certificate = credentials.Certificate(settings.fcm_credentials)
        self.project_id = settings.fcm_project_id or certificate.project_id
        self.ring_seconds = settings.call_ring_seconds
        self.timeout = settings.fcm_timeout_seconds
        self.app = firebase_admin.initialize_app(certificate, options={"projectId": self.project_id},
                                                 name=f"clinic-push-{uuid.uuid4().hex}")
        self._service = point_at(self.app, settings.fcm_endpoint, self.project_id, self.timeout)
        self._credential = certificate.get_credential()
        self._refreshing = asyncio.Lock()

    async def _authorize(self) -> None:
        """The OAuth exchange happens here, off the event loop (firebase-admin would do it blocking, inline)."""
        if self._credential.valid:
            return
        async with self._refreshing:
            if not self._credential.valid:
                request = google.auth.transport.requests.Request()
                await asyncio.wait_for(asyncio.to_thread(self._credential.refresh, request), self.timeout)

    async def send(self, pushes: Sequence[tuple[PushMessage, PushTarget]]) -> list[Outcome]:
        outcomes: list[Outcome] = [Outcome.FAILED] * len(pushes)
        ready: list[tuple[int, messaging.Message]] = []
        for i, (message, target) in enumerate(pushes):
            try:
                built = fcm_message(message, target, self.ring_seconds)
                str(built)  # validates it now: one bad push must not fail the whole batch
            except ValueError as exc:
                log.error("push refused before sending", extra={"type": message.type, "error": str(exc)})
                continue
            ready.append((i, built))
        if not ready:
            return outcomes
        try:
            await self._authorize()
        except Exception as exc:  # a refused or unreachable token endpoint: nothing can go out now
            log.warning("fcm authorization failed", extra={"error": repr(exc)})
            for i, _ in ready:
                outcomes[i] = Outcome.RETRY
            return outcomes
        for start in range(0, len(ready), MAX_BATCH):
            batch = ready[start:start + MAX_BATCH]
            try:
                answer = await messaging.send_each_async([m for _, m in batch], app=self.app)
            except Exception as exc:
                log.warning("fcm batch failed", extra={"error": repr(exc)})
                for i, _ in batch:
                    outcomes[i] = Outcome.RETRY
                continue
            for (i, _), response in zip(batch, answer.responses, strict=True):
                if response.success:
                    outcomes[i] = Outcome.SENT
                else:
                    outcomes[i] = outcome_of(response.exception) if response.exception else Outcome.RETRY
                    if outcomes[i] is not Outcome.GONE:
                        log.warning("fcm push not sent", extra={
                            "outcome": outcomes[i].value, "error": type(response.exception).__name__,
                            "code": getattr(response.exception, "code", None)})
        return outcomes

    async def aclose(self) -> None:
        await self._service._async_client.aclose()
        # delete_app closes the services with asyncio.run: not on this loop
        await asyncio.to_thread(firebase_admin.delete_app, self.app)
