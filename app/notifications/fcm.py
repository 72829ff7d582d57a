"""Pushes through FCM with firebase-admin's real send path (`messaging.send_each_async`).

firebase-admin has no endpoint setting for messaging: the send URL and the HTTP client are set on its messaging
service, private API of the pinned version (pyproject.toml); tests/integration/test_push_fcm.py fails loudly when
that seam moves. The client is ours (`FcmHttpClient`): HTTP/2 as FCM speaks it, trusting FCM_CA_FILE, no retries,
and the access token FcmPush keeps fresh off the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import urllib.parse
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import firebase_admin
import google.auth.exceptions
import google.auth.transport.requests
import httpx
import msgspec
import requests
from firebase_admin import _http_client, credentials, exceptions, messaging

from app.notifications.http2 import Http2Origin, NoHttp2
from app.notifications.push import Outcome, PushMessage, PushTarget, collapse_id, ring_ttl, title_for
from app.settings import Settings

log = logging.getLogger("app.push")

MAX_BATCH = 500  # send_each_async refuses more
# requests in flight at once over httpx (a plain http:// endpoint: a connection each): more would only queue in its
# pool, whose bookkeeping grows with the queue on every request (over HTTP/2 the server's stream limit rules)
MAX_IN_FLIGHT = 100
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


class Answer:
    """A 2xx answer, as firebase-admin reads it (`json()`)."""

    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    def json(self) -> Any:
        return _decode(self.content)


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class FcmHttpClient:
    """What firebase-admin's messaging service sends with (its `_async_client`, of which it calls `request` and
    `aclose`): HTTP/2 over TLS trusting `ca_file` (None: the system store), every push a stream of one connection
    (app/notifications/http2.py; httpx for a plain http:// endpoint or a server that does not speak HTTP/2), with
    the access token of `credential`, and no retries of its own (the outbox retries, with the same collapse key,
    and a held or lost answer is one attempt). A refused request raises httpx.HTTPStatusError, as httpx would."""

    def __init__(self, endpoint: str, credential: Any, timeout: float, ca_file: str | None) -> None:
        self._credential = credential
        self._gate = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._paths: dict[str, str] = {}
        self._fixed = [(name.lower().encode(), value.encode()) for name, value in _http_client.METRICS_HEADERS.items()]
        self.http2 = Http2Origin(endpoint, ssl.create_default_context(cafile=ca_file), timeout) \
            if endpoint.startswith("https://") else None
        self.client = httpx.AsyncClient(
            http2=True, timeout=timeout, verify=ssl.create_default_context(cafile=ca_file),
            headers=_http_client.METRICS_HEADERS,  # as firebase-admin's own client sends
            limits=httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT))

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers: dict[str, str] = kwargs.pop("headers", None) or {}
        headers["Authorization"] = f"Bearer {self._credential.token}"
        if self.http2 is not None and set(kwargs) <= {"json"}:
            try:
                return await self._over_http2(method, url, headers, kwargs.get("json"))
            except NoHttp2 as exc:
                log.warning("fcm: no HTTP/2 at the endpoint; sending over httpx", extra={"error": str(exc)})
                http2, self.http2 = self.http2, None
                await http2.aclose()
        async with self._gate:
            response = await self.client.request(method, url, headers=headers, **kwargs)
        return response.raise_for_status()

    async def _over_http2(self, method: str, url: str, headers: dict[str, str], data: Any) -> Answer:
        assert self.http2 is not None
        path = self._paths.get(url)
        if path is None:
            parts = urllib.parse.urlsplit(url)
            path = self._paths[url] = parts.path + (f"?{parts.query}" if parts.query else "")
        body = _encode(data) if data is not None else b""
        fields = [*self._fixed, *((name.lower().encode(), value.encode()) for name, value in headers.items())]
        if body:
            fields += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        status, answer_headers, content = await self.http2.request(method.upper(), path, fields, body)
        if 200 <= status < 300:
            return Answer(status, content)
        response = httpx.Response(status, headers=answer_headers, content=content,
                                  request=httpx.Request(method.upper(), url))
        raise httpx.HTTPStatusError(f"FCM answered {status}", request=response.request, response=response)

    async def aclose(self) -> None:
        if self.http2 is not None:
            await self.http2.aclose()
        await self.client.aclose()


class TokenRequest(google.auth.transport.requests.Request):
    """google-auth's `requests` transport for the token exchange, trusting `ca_file` (None: the system store);
    given with each request, as a session's own `verify` yields to REQUESTS_CA_BUNDLE."""

    def __init__(self, session: requests.Session, ca_file: str | None) -> None:
        super().__init__(session)
        self.ca_file = ca_file

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.ca_file:
            kwargs.setdefault("verify", self.ca_file)
        return super().__call__(*args, **kwargs)  # type: ignore[no-untyped-call]


def point_at(app: firebase_admin.App, endpoint: str, project_id: str, client: FcmHttpClient) -> Any:
    """The seam: the messaging service's send URL at `endpoint`, and `client` its HTTP client."""
    service = messaging._get_messaging_service(app)
    service._fcm_url = f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"
    service._async_client = client
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
        self._credential = certificate.get_credential()
        self.client = FcmHttpClient(settings.fcm_endpoint, self._credential, self.timeout, settings.fcm_ca_file)
        self._service = point_at(self.app, settings.fcm_endpoint, self.project_id, self.client)
        # the token exchange (the service account's token_uri) trusts the same authority
        self._token_session = requests.Session()
        self._token_request = TokenRequest(self._token_session, settings.fcm_ca_file)
        self._refreshing = asyncio.Lock()

    async def _authorize(self) -> None:
        """The OAuth exchange happens here, off the event loop, before a send needs the token."""
        if self._credential.valid:
            return
        async with self._refreshing:
            if not self._credential.valid:
                await asyncio.wait_for(asyncio.to_thread(self._credential.refresh, self._token_request),
                                       self.timeout)

    async def send(self, pushes: Sequence[tuple[PushMessage, PushTarget]]) -> list[Outcome]:
        outcomes: list[Outcome] = [Outcome.FAILED] * len(pushes)
        if not pushes:
            return outcomes
        built = [fcm_message(message, target, self.ring_seconds) for message, target in pushes]  # checked at the send
        try:
            await self._authorize()
        except Exception as exc:  # a refused or unreachable token endpoint: nothing can go out now
            log.warning("fcm authorization failed", extra={"error": repr(exc)})
            return [Outcome.RETRY] * len(pushes)
        batches = [list(range(start, min(start + MAX_BATCH, len(built)))) for start in range(0, len(built), MAX_BATCH)]
        for positions, answers in zip(batches, await asyncio.gather(
                *(self._send_batch(pushes, built, positions) for positions in batches)), strict=True):
            for i, outcome in zip(positions, answers, strict=True):
                outcomes[i] = outcome
        return outcomes

    async def _send_batch(self, pushes: Sequence[tuple[PushMessage, PushTarget]], built: list[messaging.Message],
                          positions: list[int]) -> list[Outcome]:
        outcomes = [Outcome.FAILED] * len(positions)
        try:
            answer = await messaging.send_each_async([built[i] for i in positions], app=self.app)
        except ValueError:
            # send_each_async encodes every message before it sends any: one it refuses (checked here only
            # then, each on its own) must not hold back the others
            valid = []
            for k, i in enumerate(positions):
                try:
                    str(built[i])
                except ValueError as exc:
                    log.error("push refused before sending", extra={"type": pushes[i][0].type, "error": str(exc)})
                    continue
                valid.append(k)
            if len(valid) == len(positions):
                raise
            if valid:
                for k, outcome in zip(valid, await self._send_batch(pushes, built, [positions[k] for k in valid]),
                                      strict=True):
                    outcomes[k] = outcome
            return outcomes
        except Exception as exc:
            log.warning("fcm batch failed", extra={"error": repr(exc)})
            return [Outcome.RETRY] * len(positions)
        for k, response in enumerate(answer.responses):
            if response.success:
                outcomes[k] = Outcome.SENT
                continue
            error = response.exception
            outcomes[k] = outcome_of(error) if error is not None else Outcome.RETRY
            if isinstance(error, exceptions.FirebaseError) and error.code == exceptions.UNAUTHENTICATED:
                self._credential.token = None  # refused: the next send exchanges the assertion again
            if outcomes[k] is not Outcome.GONE:
                log.warning("fcm push not sent", extra={
                    "outcome": outcomes[k].value, "error": type(error).__name__,
                    "code": getattr(error, "code", None)})
        return outcomes

    async def aclose(self) -> None:
        await self.client.aclose()
        self._token_session.close()
        # delete_app closes the services with asyncio.run: not on this loop
        await asyncio.to_thread(firebase_admin.delete_app, self.app)
