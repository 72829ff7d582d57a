"""FCM on loopback: Google's OAuth token endpoint (JWT-bearer grant) and FCM v1 `messages:send`.

It runs an HTTP server in a thread of its own, so the client under test (firebase-admin's real send path) speaks to
it exactly as it would to Google: a signed assertion exchanged for an access token, then one POST per message.
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.settings import Settings

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # google-auth's assertions name it, wherever token_uri is
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON body

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


class FcmStandin:
    def __init__(self, project_id: str = "clinic-test") -> None:
        self.project_id = project_id
        self.requests: list[Recorded] = []  # every messages:send that carried a valid access token
        self.token_requests: list[dict[str, Any]] = []  # the verified claims of every accepted assertion
        self.refused_auth = 0  # sends refused for a missing or unknown access token
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

    # --- life -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def start(self) -> FcmStandin:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._hold:
            self._hold.release()
        self._server.shutdown()
        self._server.server_close()

    # --- what the app is given --------------------------------------------------------------------
    def write_service_account(self, path: Path) -> Path:
        """A service-account JSON with this stand-in's fresh RSA key, its token_uri pointing here."""
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
        path.write_text(json.dumps({
            "type": "service_account", "project_id": self.project_id, "private_key_id": self._key_id,
            "private_key": pem, "client_email": self.client_email, "client_id": "1",
            "auth_uri": f"{self.url}/auth", "token_uri": self.token_uri,
        }))
        return path

    def settings(self, base: Settings, credentials_path: Path, **extra: Any) -> Settings:
        """`base` pointed at this stand-in (the service-account file is written to `credentials_path`)."""
        self.write_service_account(credentials_path)
        return msgspec.structs.replace(base, fcm_credentials=str(credentials_path), fcm_endpoint=self.url, **extra)

    def env(self, credentials_path: Path) -> dict[str, str]:
        """The same as environment variables, for a server process."""
        self.write_service_account(credentials_path)
        return {"FCM_CREDENTIALS": str(credentials_path), "FCM_ENDPOINT": self.url}

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
        access = "ya29." + secrets.token_urlsafe(24)
        with self._lock:
            self._access_tokens.add(access)
            self.token_requests.append(claims)
        return 200, {"access_token": access, "expires_in": 3599, "token_type": "Bearer"}

    def _send(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any]] | str:
        auth = headers.get("authorization", "")
        with self._lock:
            known = auth.startswith("Bearer ") and auth[7:] in self._access_tokens
            if not known:
                self.refused_auth += 1
        if not known:
            return _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.", [])
        if path != f"/v1/projects/{self.project_id}/messages:send":
            return _error(404, "NOT_FOUND", f"no such project in {path}", [])
        record = Recorded(path=path, headers=headers, body=json.loads(raw))
        with self._arrived:
            self.requests.append(record)
            self._arrived.notify_all()
            answer = self._by_token.get(record.token) or (self._next.pop(0) if self._next else "ok")
        hold = self._hold
        if hold is not None:
            hold.arrived.release()
            hold.released.wait()
            if hold.lose:
                return "lose"
        if answer == "lose":
            return "lose"
        if answer == "ok":
            return 200, {"name": f"projects/{self.project_id}/messages/{secrets.token_hex(8)}"}
        return ANSWERS[answer]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return None

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = urllib.parse.urlsplit(self.path).path
                if path == "/token":
                    result: tuple[int, dict[str, Any]] | str = standin._grant(urllib.parse.parse_qs(raw.decode()))
                else:
                    result = standin._send(path, headers, raw)
                if result == "lose":
                    self.close_connection = True
                    self.connection.close()
                    return
                assert not isinstance(result, str)
                status, body = result
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the sender is gone (a held answer outlived it): that answer is lost
                    self.close_connection = True

        return Handler

