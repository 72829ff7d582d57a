"""FCM on loopback: Google's OAuth token endpoint (JWT-bearer grant) and FCM v1 `messages:send`.

It runs its servers in threads of their own, so the client under test (firebase-admin's real send path) speaks to
it exactly as it would to Google: a signed assertion exchanged for an access token, then one POST per message.
Plain, it is one HTTP/1.1 server for both. With `tls=True` it is what Google runs: `messages:send` over HTTP/2 and
TLS (h2 on asyncio; every request of a client on one connection, one stream each) and the token endpoint over
HTTP/1.1 and TLS (google-auth's `requests`), both with a self-signed certificate made at start (`ca_file`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.settings import Settings
from tests.standins.apns import self_signed

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # google-auth's assertions name it, wherever token_uri is
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON body
    http_version: str = "1.1"  # "2" over the TLS stand-in's HTTP/2

    @property
    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = self.body["message"]
        return msg

    @property
    def token(self) -> str:
        return str(self.message.get("token") or self.message.get("fid"))


@dataclass
class Hold:
    """Requests that arrive while it is on wait, unanswered, until `release()`."""

    released: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    lose: bool = False  # on release: drop the connection instead of answering (the answer is lost)

    def release(self) -> None:
        self.released.set()

    def wait_arrived(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block until `count` requests are being held."""
        for _ in range(count):
            if not self.arrived.acquire(timeout=timeout):
                raise AssertionError("no request arrived at the held FCM stand-in")


# what the stand-in answers, by name: (HTTP status, body)
def _error(status: int, code: str, message: str, details: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"code": status, "message": message, "status": code, "details": details}}


ANSWERS: dict[str, tuple[int, dict[str, Any]]] = {
    "unregistered": _error(404, "NOT_FOUND", "Requested entity was not found.",
                           [{"@type": FCM_ERROR, "errorCode": "UNREGISTERED"}]),
    "invalid_argument": _error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token",
                               [{"@type": FCM_ERROR, "errorCode": "INVALID_ARGUMENT"},
                                {"@type": BAD_REQUEST, "fieldViolations": [
                                    {"field": "message.token", "description": "Invalid registration token"}]}]),
    "invalid_payload": _error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data'",
                              [{"@type": FCM_ERROR, "errorCode": "INVALID_ARGUMENT"},
                               {"@type": BAD_REQUEST, "fieldViolations": [
                                   {"field": "message.data", "description": "Invalid value"}]}]),
    "sender_id_mismatch": _error(403, "PERMISSION_DENIED", "SenderId mismatch",
                                 [{"@type": FCM_ERROR, "errorCode": "SENDER_ID_MISMATCH"}]),
    "quota": _error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.",
                    [{"@type": FCM_ERROR, "errorCode": "QUOTA_EXCEEDED"}]),
    "internal": _error(500, "INTERNAL", "Internal error encountered.",
                       [{"@type": FCM_ERROR, "errorCode": "INTERNAL"}]),
    "unavailable": _error(503, "UNAVAILABLE", "The service is currently unavailable.",
                          [{"@type": FCM_ERROR, "errorCode": "UNAVAILABLE"}]),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # firebase-admin opens up to 100 connections at once to send a batch


# what a request is answered: (HTTP status, a JSON body or its bytes), or "lose": no answer, the stream dropped
Answer = tuple[int, dict[str, Any] | bytes] | str


class FcmStandin:
    def __init__(self, project_id: str = "clinic-test", tls: bool = False, directory: Path | None = None,
                 max_streams: int = 100) -> None:
        self.project_id = project_id
        self.tls = tls
        self.max_streams = max_streams  # TLS: SETTINGS_MAX_CONCURRENT_STREAMS (a client past it loses the connection)
        self.requests: list[Recorded] = []  # every messages:send that carried a valid access token
        self.token_requests: list[dict[str, Any]] = []  # the verified claims of every accepted assertion
        self.refused_auth = 0  # sends refused for a missing or unknown access token
        self.h2_connections = 0  # TLS: HTTP/2 connections accepted
        self._by_token: dict[str, str] = {}  # device token -> the answer's name, for every send to it
        self._next: list[str] = []  # answers for the next sends, whatever their token
        self._hold: Hold | None = None
        self._access_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._key_id = secrets.token_hex(8)
        self.client_email = f"push@{project_id}.iam.gserviceaccount.com"
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="fcm-standin", daemon=True)
        self.ca_file: Path | None = None
        self._h2: _H2Server | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if tls:
            if directory is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="fcm-standin-")
                directory = Path(self._scratch.name)
            self.ca_file, key_file = self_signed(directory, "fcm-standin")
            # the token endpoint: HTTP/1.1 over TLS (what `requests` speaks); the handshake in the handler's thread
            plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            plain.load_cert_chain(self.ca_file, key_file)
            plain.set_alpn_protocols(["http/1.1"])
            self._server.socket = plain.wrap_socket(self._server.socket, server_side=True,
                                                    do_handshake_on_connect=False)
            h2_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            h2_tls.load_cert_chain(self.ca_file, key_file)
            h2_tls.set_alpn_protocols(["h2"])
            self._h2 = _H2Server(self, h2_tls)

    # --- life -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Where `messages:send` is (FCM_ENDPOINT)."""
        if self._h2 is not None:
            return f"https://127.0.0.1:{self._h2.port}"
        return self.token_url

    @property
    def token_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_uri(self) -> str:
        return f"{self.token_url}/token"

    def start(self) -> Self:
        self._thread.start()
        if self._h2 is not None:
            self._h2.start()
        return self

    def stop(self) -> None:
        if self._hold:
            self._hold.release()
        if self._h2 is not None:
            self._h2.stop()
        self._server.shutdown()
        self._server.server_close()
        if self._scratch is not None:
            self._scratch.cleanup()

    # --- what the app is given --------------------------------------------------------------------
    def write_service_account(self, path: Path) -> Path:
        """A service-account JSON with this stand-in's fresh RSA key, its token_uri pointing here."""
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
        path.write_text(json.dumps({
            "type": "service_account", "project_id": self.project_id, "private_key_id": self._key_id,
            "private_key": pem, "client_email": self.client_email, "client_id": "1",
            "auth_uri": f"{self.token_url}/auth", "token_uri": self.token_uri,
        }))
        return path

    def settings(self, base: Settings, credentials_path: Path, **extra: Any) -> Settings:
        """`base` pointed at this stand-in (the service-account file is written to `credentials_path`)."""
        self.write_service_account(credentials_path)
        return msgspec.structs.replace(base, fcm_credentials=str(credentials_path), fcm_endpoint=self.url,
                                       fcm_ca_file=str(self.ca_file) if self.ca_file else None, **extra)

    def env(self, credentials_path: Path) -> dict[str, str]:
        """The same as environment variables, for a server process."""
        self.write_service_account(credentials_path)
        return {"FCM_CREDENTIALS": str(credentials_path), "FCM_ENDPOINT": self.url,
                **({"FCM_CA_FILE": str(self.ca_file)} if self.ca_file else {})}

    # --- controls ---------------------------------------------------------------------------------
    def answer_token(self, token: str, answer: str) -> None:
        """Every send to `token` gets this answer (a name in ANSWERS, "lose" to drop the connection, or "ok")."""
        assert answer in ANSWERS or answer in ("ok", "lose"), answer
        with self._lock:
            self._by_token[token] = answer

    def answer_next(self, *answers: str) -> None:
        """The next sends (in arrival order) get these answers, whatever their token."""
        assert all(a in ANSWERS or a in ("ok", "lose") for a in answers), answers
        with self._lock:
            self._next.extend(answers)

    @property
    def hold(self) -> Hold | None:
        return self._hold

    def hold_sends(self, lose: bool = False) -> Hold:
        """Sends from now on wait unanswered until the returned hold is released (then answered, or dropped)."""
        self._hold = Hold(lose=lose)
        return self._hold

    def revoke_access_tokens(self) -> None:
        """Every access token granted so far is refused from now on (as when Google revokes them)."""
        with self._lock:
            self._access_tokens.clear()

    def hold_no_more(self) -> Hold | None:
        """Sends from now on are answered at once; those held so far wait on for the returned hold's release."""
        hold, self._hold = self._hold, None
        return hold

    def drop_connections(self) -> None:
        """TLS: every HTTP/2 connection cut now, without a GOAWAY (what their held requests wait for is lost)."""
        assert self._h2 is not None
        self._h2.drop()

    def stop_holding(self) -> None:
        if self._hold:
            self._hold.release()
        self._hold = None

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        """Block until `count` sends have been recorded (from a thread: `await asyncio.to_thread(...)`)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} of {count} pushes reached the FCM stand-in")
            return list(self.requests)

    def tokens(self) -> Iterator[str]:
        return (r.token for r in self.requests)

    # --- the wire -------------------------------------------------------------------------------
    def _grant(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") != [JWT_BEARER] or not form.get("assertion"):
            return 400, {"error": "unsupported_grant_type"}
        try:
            claims = jwt.decode(form["assertion"][0], self._key.public_key(), algorithms=["RS256"],
                                audience=GOOGLE_TOKEN_AUDIENCE, issuer=self.client_email)
        except jwt.InvalidTokenError as exc:
            return 400, {"error": "invalid_grant", "error_description": str(exc)}
        access = "ya29." + secrets.token_urlsafe(165)  # about as long as Google's (some 220 characters)
        with self._lock:
            self._access_tokens.add(access)
            self.token_requests.append(claims)
        return 200, {"access_token": access, "expires_in": 3599, "token_type": "Bearer"}

    def route(self, method: str, path: str, headers: dict[str, str], raw: bytes,
              http_version: str) -> tuple[Answer, Hold | None]:
        """What a request is answered, and the hold it must wait on first (None: answer at once)."""
        if path == "/token" and method == "POST":
            return self._grant(urllib.parse.parse_qs(raw.decode())), None
        return self._send(path, headers, raw, http_version)

    def _send(self, path: str, headers: dict[str, str], raw: bytes,
              http_version: str) -> tuple[Answer, Hold | None]:
        auth = headers.get("authorization", "")
        with self._lock:
            known = auth.startswith("Bearer ") and auth[7:] in self._access_tokens
            if not known:
                self.refused_auth += 1
        if not known:
            return _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.", []), None
        if path != f"/v1/projects/{self.project_id}/messages:send":
            return _error(404, "NOT_FOUND", f"no such project in {path}", []), None
        record = Recorded(path=path, headers=headers, body=json.loads(raw), http_version=http_version)
        with self._arrived:
            answer = self._by_token.get(record.token) or (self._next.pop(0) if self._next else "ok")
            self.record(record)
        hold = self._hold
        if hold is not None:
            hold.arrived.release()
            if hold.lose:
                answer = "lose"
        if answer == "ok":
            return (200, {"name": f"projects/{self.project_id}/messages/{secrets.token_hex(8)}"}), hold
        return ("lose" if answer == "lose" else ANSWERS[answer]), hold

    def record(self, sent: Recorded) -> None:
        """Keeps an accepted send (called under the lock)."""
        self.requests.append(sent)
        self._arrived.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return None

            def do_POST(self) -> None:
                self._answer("POST")

            def do_GET(self) -> None:
                self._answer("GET")

            def _answer(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = urllib.parse.urlsplit(self.path).path
                result, hold = standin.route(method, path, headers, raw, "1.1")
                if hold is not None:
                    hold.released.wait()
                if result == "lose":
                    self.close_connection = True
                    self.connection.close()
                    return
                assert not isinstance(result, str)
                status, body = result
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the sender is gone (a held answer outlived it): that answer is lost
                    self.close_connection = True

        return Handler



class _H2Server:
    """`messages:send` over HTTP/2 and TLS: an asyncio loop in a thread of its own, one h2 state machine per
    connection. A held request waits in a thread (the loop answers the others meanwhile); a lost one is reset."""

    def __init__(self, standin: FcmStandin, tls: ssl.SSLContext) -> None:
        self.standin = standin
        self.tls = tls
        self.port = 0
        self.transports: set[asyncio.Transport] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fcm-standin-h2", daemon=True)

    def start(self) -> None:
        self._thread.start()

        async def listen() -> int:
            self._server = await self._loop.create_server(lambda: _H2Connection(self), "127.0.0.1", 0,
                                                          ssl=self.tls, backlog=1024)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)

    def drop(self) -> None:
        async def abort() -> None:
            for transport in list(self.transports):
                transport.abort()

        asyncio.run_coroutine_threadsafe(abort(), self._loop).result(10)

    def stop(self) -> None:
        def close() -> None:
            if self._server:
                self._server.close()
            for transport in list(self.transports):
                transport.abort()
            self._loop.stop()

        self._loop.call_soon_threadsafe(close)
        self._thread.join(10)
        self._loop.close()


class _H2Connection(asyncio.Protocol):
    def __init__(self, server: _H2Server) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.standin.max_streams})
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.transports.add(transport)
        with self.server.standin._lock:
            self.server.standin.h2_connections += 1
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = ({str(k): str(v) for k, v in event.headers or []}, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                self.streams[event.stream_id][1].extend(event.data or b"")
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._request(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    def _request(self, stream_id: int) -> None:
        headers, raw = self.streams.pop(stream_id)
        method, path = headers.pop(":method", ""), urllib.parse.urlsplit(headers.pop(":path", "")).path
        answer, hold = self.server.standin.route(method, path, {k: v for k, v in headers.items()
                                                                if not k.startswith(":")}, bytes(raw), "2")
        if hold is None:
            self._respond(stream_id, answer)
            return

        async def held() -> None:
            await asyncio.to_thread(hold.released.wait)
            if self.transport is not None and not self.transport.is_closing():
                self._respond(stream_id, answer)
                self.transport.write(self.conn.data_to_send())

        asyncio.get_running_loop().create_task(held())

    def _respond(self, stream_id: int, answer: Answer) -> None:
        try:
            if isinstance(answer, str):  # the answer is lost: the stream is reset, the connection's others go on
                self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                return
            status, body = answer
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.conn.send_headers(stream_id, [(":status", str(status)),
                                               ("content-type", "application/json; charset=UTF-8"),
                                               ("content-length", str(len(data)))])
            self.conn.send_data(stream_id, data, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):  # the client gave up on it
            return
