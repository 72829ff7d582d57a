"""No log line carries a token, a ticket, a code, a phone, a name or a text, whatever logs it and however."""

from __future__ import annotations

import io
import json
import logging

import pytest

from app.observability import JsonFormatter, RedactingFilter, redact

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlX29mX3RoZV90b2tlbg"


@pytest.mark.parametrize(("line", "secret"), [
    (f'127.0.0.1:5 - "WebSocket /api/v1/ws?token={JWT}" [accepted]', JWT),
    ('"WebSocket /api/v1/ws?ticket=k3Hq0xWc9d1m8Zp2&x=1" 403', "k3Hq0xWc9d1m8Zp2"),
    ("Authorization: Bearer opaque-metrics-token-1234", "opaque-metrics-token-1234"),
    (f"token rejected: {JWT}", JWT),
    ('body {"phone": "+79161234567", "code": "493021"}', "493021"),
    ('{"full_name": "Anna Ivanova", "text": "a private symptom"}', "Anna Ivanova"),
    ('{"full_name": "Anna Ivanova", "text": "a private symptom"}', "a private symptom"),
    ("sms to +79161234567 failed", "79161234567"),
    ("/callback?code=493021&state=1", "493021"),
    ("DETAIL:  Key (phone)=(89161234567) already exists.", "89161234567"),
    ("[SQL: INSERT INTO messages (id, text) VALUES ($1, $2)]\n[parameters: ('1', 'a private symptom')]",
     "a private symptom"),
    ("invalid input for query argument $2: 'Anna Ivanova' (expected str)", "Anna Ivanova"),
])
def test_secrets_are_redacted(line: str, secret: str) -> None:
    assert secret not in redact(line)


@pytest.mark.parametrize("phone", ["89161234567", "79161234567", "9161234567", "+7 916 111-00-01",
                                   "8 (916) 123-45-67", "+7 (916) 123-45-67", "+7-916-123-45-67", "030 1234567",
                                   "+49 30 1234567"])
def test_phones_are_redacted_however_they_are_written(phone: str) -> None:
    written = redact(f"sms to {phone} failed; tel:{phone}, Key (phone)=({phone}) already exists")
    assert not any(ch.isdigit() for ch in written), written


@pytest.mark.parametrize("kept", [
    "0193a0c4-5b7e-7c3d-9f10-2b8e4a6d1c55", "12345678-1234-1234-1234-123456789012",  # UUIDs, even all digits
    "00000000-0000-0000-0000-000000000000", "5d9f3c2a8b1e4f7a9c6d0e2b4a8f1d3c",  # a request id
    "12345678901234567890123456789012", "req-12345678901234", "batch_79161234567",  # client-given request ids
    "2026-12-01T09:00:00+03:00", "2026-12-01 09:00:00.123456", "2026-12-01 09:00 2026-12-07 18:30",  # times
    "1764582000", "1764582000123", "1764582000.123",  # Unix times in seconds and milliseconds
    "took 1234.5678901234 ms", "0.123456789012", "10.0.0.5:5000", "2001:db8::7",  # durations, addresses
])
def test_ids_times_and_durations_are_not_taken_for_phones(kept: str) -> None:
    assert redact(f"at {kept} ok") == f"at {kept} ok"


def _written(**extra: object) -> dict[str, object]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction.extras")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("event", extra=extra)
    finally:
        logger.removeHandler(handler)
    entry: dict[str, object] = json.loads(stream.getvalue())
    return entry


def test_extras_of_any_shape_are_redacted() -> None:
    entry = _written(body={"phone": "+79161234567", "full_name": "Anna Ivanova", "items": [{"code": "493021"}]},
                     hops=["sms to 89161234567", f"token={JWT}"], pair=("8 916 123 45 67", 3),
                     tags={"+7 916 111-00-01"}, status=200, ms=12.5, ok=True, none=None)
    written = json.dumps(entry)
    for secret in ("79161234567", "9161234567", "Anna Ivanova", "493021", JWT, "916 123 45 67", "111-00-01"):
        assert secret not in written, (secret, written)
    assert entry["body"] == {"phone": "[redacted]", "full_name": "[redacted]", "items": [{"code": "[redacted]"}]}
    assert entry["hops"] == ["sms to [redacted-phone]", "token=[redacted]"]
    assert (entry["status"], entry["ms"], entry["ok"], entry["none"]) == (200, 12.5, True, None)


def test_an_extra_json_cannot_encode_is_redacted_as_its_text() -> None:
    entry = _written(odd={(1, 2): "89161234567"}, thing=Exception("sms to +79161234567"))
    assert "9161234567" not in json.dumps(entry)


def test_a_record_with_arguments_extras_and_a_traceback_is_written_without_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", f"/api/v1/ws?token={JWT}",
                       extra={"path": f"/x?ticket=abc123secret&token={JWT}"})
        try:
            raise ValueError(f"bad token {JWT} for +79161234567")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert JWT not in written
    assert "abc123secret" not in written
    assert "79161234567" not in written
    first, second = (json.loads(line) for line in written.splitlines())
    assert first["msg"] == '127.0.0.1:5 - "WebSocket /api/v1/ws?token=[redacted]" [accepted]'
    assert "ValueError" in second["exc"]
