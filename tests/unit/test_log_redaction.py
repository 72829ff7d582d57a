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
