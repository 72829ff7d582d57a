"""APNs on loopback: an HTTP/2 server over TLS (h2 on asyncio, in a thread of its own) that checks what Apple
checks — the ES256 provider token against the team's public key, the VoIP headers — records every request and
answers 200 or the error asked for."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import jwt
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.settings import Settings


@dataclass
class ApnsRecorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON payload
    status: int  # what the stand-in answered
    reason: str | None
    claims: dict[str, Any] | None  # the verified provider token's claims (None: it was refused)
    token_header: dict[str, Any] | None  # its JOSE header (alg, kid)
    connection: int  # which TLS connection carried it (0, 1, ...)

    @property
    def device_token(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def self_signed(directory: Path, name: str = "apns-standin") -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 that is its own authority: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), True)
            .add_extension(ski, False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class ApnsStandin:
    def __init__(self, directory: Path, team_id: str = "TEAM123456", key_id: str = "KEYID12345",
                 topic: str = "ru.clinic.app") -> None:
        self.team_id, self.key_id, self.topic = team_id, key_id, topic
        self.requests: list[ApnsRecorded] = []
        self.connections = 0
        self._transports: list[asyncio.Transport] = []
        self._answers: dict[str, tuple[int, str]] = {}  # device token -> (status, reason)
        self._next: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        signing = ec.generate_private_key(ec.SECP256R1())  # the team's key: the app signs, the stand-in verifies
        self.public_key = signing.public_key()
        self.key_file = directory / f"AuthKey_{key_id}.p8"
        self.key_file.write_bytes(signing.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        self.ca_file, server_key = self_signed(directory)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(self.ca_file, server_key)
        self._tls.set_alpn_protocols(["h2"])
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="apns-standin", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> ApnsStandin:
        self._thread.start()

        async def listen() -> int:
            self._server = await self._loop.create_server(lambda: _H2(self), "127.0.0.1", 0, ssl=self._tls)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        def close() -> None:
            if self._server:
                self._server.close()
            for transport in self._transports:
                transport.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(close)
        self._thread.join(10)
        self._loop.close()

    def settings(self, base: Settings, **extra: Any) -> Settings:
        return msgspec.structs.replace(base, **self.fields(), **extra)

    def fields(self) -> dict[str, Any]:
        return {"apns_key_file": str(self.key_file), "apns_key_id": self.key_id, "apns_team_id": self.team_id,
                "apns_topic": self.topic, "apns_endpoint": self.url, "apns_ca_file": str(self.ca_file)}

    def env(self) -> dict[str, str]:
        return {name.upper(): str(value) for name, value in self.fields().items()}

    # --- controls ---------------------------------------------------------------------------------
    def answer_token(self, device_token: str, status: int, reason: str = "") -> None:
        """Every push to `device_token` is answered so (410 "Unregistered", 400 "BadDeviceToken", 503 ...)."""
        with self._lock:
            self._answers[device_token] = (status, reason)

    def answer_next(self, status: int, reason: str = "") -> None:
        with self._lock:
            self._next.append((status, reason))

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[ApnsRecorded]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} of {count} pushes reached the APNs stand-in")
            return list(self.requests)

    # --- what Apple checks ------------------------------------------------------------------------
    def _verify(self, headers: dict[str, str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
        auth = headers.get("authorization", "")
        if not auth.startswith("bearer "):
            return None, None, "MissingProviderToken"
        token = auth[len("bearer "):]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"], options={"verify_iat": False,
                                                                                     "require": ["iss", "iat"]})
        except jwt.InvalidTokenError:
            return None, None, "InvalidProviderToken"
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return None, None, "InvalidProviderToken"
        if claims["iat"] < time.time() - 3600:
            return None, None, "ExpiredProviderToken"
        return claims, header, ""

    def _answer(self, method: str, path: str, headers: dict[str, str], raw: bytes, connection: int) -> tuple[int, str]:
        claims, token_header, reason = self._verify(headers)
        status = 403 if reason else 200
        if not reason:
            if method != "POST":
                status, reason = 405, "MethodNotAllowed"
            elif not path.startswith("/3/device/") or len(path) <= len("/3/device/"):
                status, reason = 404, "BadPath"
            elif headers.get("apns-push-type") != "voip":
                status, reason = 400, "InvalidPushType"
            elif headers.get("apns-topic") != f"{self.topic}.voip":
                status, reason = 400, "DeviceTokenNotForTopic"
            elif headers.get("apns-priority") not in (None, "5", "10"):
                status, reason = 400, "BadPriority"
            elif not headers.get("apns-expiration", "0").isdigit():
                status, reason = 400, "BadExpirationDate"
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body, status, reason = raw, 400, "PayloadEmpty"
        with self._arrived:
            if status == 200:
                device = path.rsplit("/", 1)[-1]
                if device in self._answers:
                    status, reason = self._answers[device]
                elif self._next:
                    status, reason = self._next.pop(0)
            self.requests.append(ApnsRecorded(method, path, headers, body, status, reason or None, claims,
                                              token_header, connection))
            self._arrived.notify_all()
        return status, reason


class _H2(asyncio.Protocol):
    def __init__(self, standin: ApnsStandin) -> None:
        self.standin = standin
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.transport: asyncio.Transport | None = None
        with standin._lock:
            self.number = standin.connections
            standin.connections += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.standin._transports.append(transport)
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = ({str(k): str(v) for k, v in event.headers or []}, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                self.streams[event.stream_id][1].extend(event.data or b"")
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._respond(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    def _respond(self, stream_id: int) -> None:
        headers, raw = self.streams.pop(stream_id)
        method, path = headers.pop(":method", ""), headers.pop(":path", "")
        status, reason = self.standin._answer(method, path, {k: v for k, v in headers.items()
                                                             if not k.startswith(":")}, bytes(raw), self.number)
        answer = [(":status", str(status)), ("apns-id", str(uuid.uuid4()).upper())]
        if status == 200:
            self.conn.send_headers(stream_id, answer, end_stream=True)
            return
        body = json.dumps({"reason": reason, **({"timestamp": int(time.time() * 1000)} if status == 410 else {})})
        self.conn.send_headers(stream_id, [*answer, ("content-type", "application/json"),
                                           ("content-length", str(len(body)))])
        self.conn.send_data(stream_id, body.encode(), end_stream=True)
