"""Every knob of the service, read from environment variables (names are the upper-cased fields).

Unset backing services fall back to the embedded profile: a SQLite file, in-process
pub/sub and limits, a local-disk object store and SMS written to a log file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import msgspec


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1  # server processes on this machine; more than one needs Redis for realtime fan-out
    data_dir: str = "./var"
    database_url: str = ""  # empty: sqlite file under data_dir
    redis_url: str | None = None  # None: in-process pub/sub and rate limits
    redis_pool_size: int = 100  # connections per process; more callers wait for one
    redis_timeout_seconds: float = 5.0  # a command unanswered this long fails instead of hanging its caller
    s3_endpoint_url: str | None = None  # None: local-disk object store under data_dir/objects
    s3_bucket: str = "clinic"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    s3_public_endpoint_url: str | None = None  # the endpoint as clients reach it, for presigned URLs; None: as above
    s3_addressing_style: str = "path"  # path | virtual | auto: path suits SeaweedFS/MinIO, virtual some clouds
    s3_sse: str = "AES256"  # server-side encryption of every write (SSE-S3); empty: the endpoint's default
    s3_threads: int = 16  # boto3 blocks: its calls run in a thread pool of this size, never on the event loop
    s3_part_bytes: int = 8 * 1024 * 1024  # a streamed upload goes out as multipart parts of this size (min 5 MiB)

    # documents: every kind is capped; URLs handed out are short-lived, the bytes never go through a handler
    document_max_bytes: int = 25 * 1024 * 1024
    document_url_seconds: int = 60  # a download URL's life (presigned GET)
    document_upload_url_seconds: int = 900  # a presigned PUT's life: minutes, for a slow phone connection
    document_pending_seconds: int = 3600  # an upload never completed is dropped (object deleted) after this
    # a PDF's object streams are inflated to look for scripts in them; past this many inflated bytes the file
    # is refused (415 pdf_unscannable) rather than scanned without bound (a compression bomb)
    document_scan_inflate_bytes: int = 16 * 1024 * 1024

    default_region: str = "RU"  # how phone numbers without a country code are read
    clinic_timezone: str = "Europe/Moscow"

    otp_ttl_seconds: int = 300
    otp_max_attempts: int = 5
    otp_resend_seconds: int = 60
    otp_per_ip_per_hour: int = 100
    otp_length: int = 6
    # wrong codes per phone per hour, across every code sent to it: past it the phone is locked for the rest
    # of the hour (without it, a fresh code every minute would give five more guesses each time)
    otp_failures_per_phone_per_hour: int = 10
    # proxies whose X-Forwarded-For is believed ("10.0.0.1,10.1.0.0/16"); empty: the peer is the client
    trusted_proxies: str = ""

    # "kid=secret,kid2=secret2": the first key signs; the others still verify (rotation overlap).
    # Empty: a key is generated once and kept in data_dir/secrets.json.
    jwt_keys: str = ""
    secret_key: str = ""  # HMAC pepper for OTP codes; empty: generated and kept like jwt_keys
    access_token_seconds: int = 900
    # without a live revocation broadcast (Redis down, or the embedded profile), how often each instance reloads
    # the recent revocations from the database: the longest a revoked token still works elsewhere
    revocation_poll_seconds: float = 2.0
    refresh_token_days: int = 30
    # how long after the last completed consultation a specialist stays in care of the patient (reads the card)
    care_after_days: int = 365

    sms_backend: str = "log"  # log | http
    sms_log_path: str = ""  # empty: data_dir/sms.log
    sms_http_url: str | None = None
    sms_http_token: str | None = None  # sent as "Authorization: Bearer <token>"
    sms_http_user: str | None = None  # or HTTP basic credentials
    sms_http_password: str | None = None
    sms_http_template: str = '{"to": "{to}", "text": "{text}"}'  # JSON body; "{to}" and "{text}" filled in
    sms_http_timeout_seconds: float = 5.0
    sms_http_retries: int = 3

    # pushes to phones (app/notifications/push.py); neither FCM nor APNs set: JSON lines in PUSH_LOG_PATH
    push_log_path: str = ""  # empty: data_dir/push.log
    fcm_credentials: str | None = None  # path of a service-account JSON (its token_uri is honoured)
    fcm_project_id: str | None = None  # None: the service account's project
    fcm_endpoint: str = "https://fcm.googleapis.com"  # a local stand-in in tests
    fcm_timeout_seconds: float = 10.0  # one HTTP request to FCM; past it the push is retried later
    fcm_ca_file: str | None = None  # trust for FCM's and the token endpoint's certificates; None: the system store
    # APNs VoIP (iOS calls): PushKit pushes that firebase-admin cannot send; all four of key file, key id, team id
    # and topic are needed to enable it
    apns_key_file: str | None = None  # the .p8 signing key (ES256) from the Apple developer account
    apns_key_id: str | None = None  # its key id (the token's kid)
    apns_team_id: str | None = None  # the team id (the token's iss)
    apns_topic: str | None = None  # the app's bundle id; VoIP pushes go to "<topic>.voip"
    apns_endpoint: str = "https://api.push.apple.com"
    apns_ca_file: str | None = None  # trust for APNs' certificate; None: the system store (tests: a self-signed CA)
    apns_timeout_seconds: float = 10.0
    # how long an unanswered call rings before it is missed; a call's push never outlives it (ttl, apns-expiration)
    call_ring_seconds: int = 45
    # how often each API instance asks which SFU nodes are alive: a dead node's calls end `failed` within about this
    # (one Redis read each time; the calls table is read only when a node went missing, and once a minute besides)
    call_node_check_seconds: float = 2.0
    # ICE servers handed to call clients (GET /api/v1/rtc/ice-servers), comma lists: "stun:turn.clinic.ru:3478",
    # "turn:turn.clinic.ru:3478?transport=udp,turns:turn.clinic.ru:5349". Empty STUN: none (no third party's
    # STUN by default: medical secrecy); TURN only with TURN_SECRET, coturn's static-auth-secret (the REST scheme:
    # time-limited credentials, infra/coturn/turnserver.conf), each good for TURN_CREDENTIAL_SECONDS
    stun_urls: str = ""
    turn_urls: str = ""
    turn_secret: str | None = None
    # TURN credentials go only to a participant of a live call (?call_id=), and a leaked one is good for an hour at
    # most; coturn checks it on every refresh, so a client in a longer call fetches fresh ones and restarts ICE
    turn_credential_seconds: int = 3600
    # offers (socket and REST) per user per minute: each one costs the SFU a peer connection and its ports
    rtc_offers_per_minute: int = 20
    # SFU nodes (app/rtc/placement.py, app/rtc/sfu/node.py). SFU_URLS empty: the SFU runs inside the API process;
    # set ("http://10.0.0.5:8100,http://10.0.0.6:8100"): each call's room is placed on the least-loaded live one
    sfu_urls: str = ""
    sfu_secret: str | None = None  # the nodes' control interface answers only "Bearer <SFU_SECRET>"; required there
    sfu_listen: str = "127.0.0.1:8100"  # a node's control interface (host:port)
    sfu_public_url: str = ""  # what a node registers (as listed in the API's SFU_URLS); empty: http://SFU_LISTEN
    # a node writes its load to Redis this often; one silent for three of these is dead (its calls end failed)
    sfu_heartbeat_seconds: float = 1.0
    sfu_timeout_seconds: float = 5.0  # one control request (an offer's answer); past it: 503 sfu_unavailable
    # the SFU's media sockets (app/rtc/sfu/ice.py): the only addresses it offers as host candidates (a comma list;
    # empty: every interface's, never 127.0.0.1, as aioice finds them; tests: 127.0.0.1), and the UDP port range it
    # binds in ("40000-40999", what the firewall opens; empty: ephemeral ports). One port per participant.
    rtc_host_addresses: str = ""
    rtc_udp_ports: str = ""
    # each media socket's UDP receive buffer (SO_RCVBUF), so a keyframe's burst of packets is not dropped before the
    # SFU reads it; the kernel caps it at net.core.rmem_max (raise that to match); 0: the system's default
    rtc_udp_rcvbuf_bytes: int = 4 * 1024 * 1024
    # video codecs a room may use, by preference: the first one the first participant offers becomes the room's,
    # and both legs are forced to it (the SFU forwards, it cannot convert). VP8 first: every WebRTC client has it
    rtc_video_codecs: str = "VP8,H264"

    # the outbox worker (app/notifications/worker.py): sends the pushes and SMS that outbox rows mean
    outbox_worker_in_api: bool = True  # run it inside each API process too (the embedded profile always does)
    outbox_poll_seconds: float = 5.0  # without a wake-up after a commit (another process, no Redis), look this often
    outbox_batch_size: int = 500  # rows claimed at once; their pushes go to the provider in one call
    outbox_lease_seconds: float = 60.0  # a claim not finished within it (a killed worker) is taken over
    outbox_retry_base_seconds: float = 10.0  # the first retry's delay; doubled each time, with jitter
    outbox_max_attempts: int = 8  # then the row is marked failed (GET /api/v1/outbox/failed, metrics)
    reminder_offsets: str = "24h,1h"  # reminders before each consultation ("30m", "2h", "1d")

    # online payment: patients pay through a provider and a visit is paid when the provider confirms it;
    # "none": only the front desk takes payments (online payment answers 409 online_payment_unavailable)
    payment_provider: str = "none"  # none | yookassa
    yookassa_shop_id: str | None = None  # HTTP basic user of the YooKassa API
    yookassa_secret_key: str | None = None  # and its password
    yookassa_api_url: str = "https://api.yookassa.ru/v3"
    payment_return_url: str = ""  # where the provider sends the payer back (the app's page); required online
    payment_description: str = "Оплата услуг клиники"  # what the payer's bank shows: nothing personal or medical
    payment_timeout_seconds: float = 10.0  # one call to the provider
    refund_retry_seconds: float = 30.0  # how often refunds due are sent to the provider (and the first backoff)
    # then a refund still not through is logged as a warning for staff; it keeps being retried (a timeout may
    # hide a refund the provider made), only the provider's refusal hands it to the front desk
    refund_max_attempts: int = 8

    hold_seconds: int = 300  # how long a clicked slot stays held for the one who clicked it
    # per-user counts a clinic never reaches and a script always does (beyond them: 409 with a reason)
    live_bookings_per_patient: int = 10  # future, not ended consultations of one patient (too_many_bookings)
    waitlist_per_patient: int = 10  # open waitlist requests of one patient (too_many_waitlist_requests)
    dependents_per_guardian: int = 20  # dependents one account manages (too_many_dependents)
    devices_per_user: int = 10  # push registrations kept per user; a new one beyond it replaces the oldest
    holds_per_patient: int = 2  # live holds one patient may have at once (front desks hold for many: exempt)
    start_early_minutes: int = 15  # how long before its slot a visit may be started
    online_prepaid: bool = True  # an online visit starts only once it is paid
    slot_refresh_seconds: float = 3600.0  # how often schedules' slots are extended to their horizon
    slot_feed_cache_seconds: float = 5.0  # the partner feed may be this stale; polling within it costs nothing
    specialty_rules_cache_seconds: float = 5.0  # the public catalogue's rules, read per call: other instances see
    # an admin's change within this (the changing instance at once)

    chat_sends_per_minute: int = 120  # per user, across their devices
    chat_max_extension_days: int = 90  # how far ahead a specialist may extend a chat
    chat_edit_seconds: int = 900  # how long an author may still edit or delete a message
    chat_send_writers: int = 1  # groups of sends written at once (app/chat/sending.py)
    chat_write_timeout_seconds: float = 5.0  # a group's statement waiting longer fails the group (503)
    ws_heartbeat_seconds: float = 30.0  # a socket silent for longer is closed; clients ping within it
    ws_queue_limit: int = 1000  # events waiting for one slow socket before it is let go
    ws_max_frame_bytes: int = 16384  # a larger client message is refused (1009) before it is buffered; a WebRTC
    # offer (rtc.offer, a few KB of SDP) is the largest a client sends
    ws_per_user: int = 10  # sockets one user may hold on one process; a newer one closes the oldest (4409)
    ws_ticket_seconds: float = 30.0  # a socket ticket (POST /api/v1/ws/ticket) is good once, within this time

    # the audit log of staff reads of medical data (app/audit/service.py): rows are queued in memory and written
    # in one INSERT every AUDIT_FLUSH_SECONDS, or as soon as AUDIT_BATCH_ROWS wait (a crash loses at most one
    # interval; a clean shutdown none); past AUDIT_MAX_PENDING queued rows (the database refusing them for long)
    # new ones are dropped, counted and logged rather than grow memory without end
    audit_flush_seconds: float = 0.2
    audit_batch_rows: int = 500
    audit_max_pending: int = 100_000
    audit_enabled: bool = True  # off only to measure what auditing costs (bench/audit.py); the law wants it on

    # a request body larger than this is refused with 413 before it is read whole (uploads have their own limit)
    max_body_bytes: int = 1_048_576
    # where clients reach the API (https://clinic.example): the base of links it writes into answers; empty: the
    # request's own scheme and Host (right without a TLS-terminating proxy in front)
    public_base_url: str = ""
    # a body that stops arriving for this long is refused with 408 (slowloris), and one on any route but the file
    # uploads (every JSON body) must be in within BODY_SECONDS; a file upload has the gap bound alone
    body_idle_seconds: float = 30.0
    body_seconds: float = 60.0
    log_level: str = "INFO"
    log_requests: bool = True
    # /metrics answers only "Authorization: Bearer <METRICS_TOKEN>"; unset: it is not served on the API port
    # (404), only on METRICS_ADDRESS ("127.0.0.1:9100"), a listener of its own when that is set
    metrics_token: str | None = None
    metrics_address: str | None = None
    # OpenTelemetry tracing, off unless set: spans go over OTLP/HTTP to <endpoint>/v1/traces (app/tracing.py)
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "clinic-api"
    demo_data: bool = False  # load the demo clinic on first start (make run sets it)
    db_pool_size: int = 40  # PostgreSQL connections kept per process (a quarter more may open at peaks)
    # PostgreSQL connections of the hot reads (app/reads.py), beside DB_POOL_SIZE; a read holds one for a
    # fraction of a millisecond, so a few carry a worker's reads
    db_read_pool_size: int = 10
    db_read_timeout_seconds: float = 10.0  # a hot read that takes longer is cancelled and answered 503

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{Path(self.data_dir) / 'clinic.db'}"

    @property
    def resolved_sms_log_path(self) -> Path:
        return Path(self.sms_log_path) if self.sms_log_path else Path(self.data_dir) / "sms.log"

    @property
    def resolved_push_log_path(self) -> Path:
        return Path(self.push_log_path) if self.push_log_path else Path(self.data_dir) / "push.log"

    @property
    def objects_dir(self) -> Path:
        return Path(self.data_dir) / "objects"

    @property
    def signing_keys(self) -> list[tuple[str, str]]:
        """(kid, secret) pairs, the signing key first."""
        pairs = []
        for item in self.jwt_keys.split(","):
            kid, sep, secret = item.strip().partition("=")
            if not sep or not kid or len(secret) < 32:
                raise ValueError("JWT_KEYS must be 'kid=secret,...' with secrets of 32+ characters")
            pairs.append((kid, secret))
        return pairs


def settings_from_env(env: Mapping[str, str] = os.environ) -> Settings:
    given = {f: env[f.upper()] for f in Settings.__struct_fields__ if f.upper() in env}
    return with_generated_secrets(msgspec.convert(given, Settings, strict=False))


def with_generated_secrets(settings: Settings) -> Settings:
    """Fill unset secrets from data_dir/secrets.json, creating it once, so restarts keep sessions valid."""
    if settings.jwt_keys and settings.secret_key:
        return settings
    path = Path(settings.data_dir) / "secrets.json"
    if not path.exists():
        fresh = {"jwt_keys": f"k1={secrets.token_urlsafe(48)}", "secret_key": secrets.token_urlsafe(48)}
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: when two processes start at once, the first file wins and both read it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(fresh, f)
        except FileExistsError:
            pass
    stored = json.loads(path.read_text())
    return msgspec.structs.replace(
        settings,
        jwt_keys=settings.jwt_keys or stored["jwt_keys"],
        secret_key=settings.secret_key or stored["secret_key"],
    )
