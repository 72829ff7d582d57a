"""coturn REST-scheme credentials (use-auth-secret): username "<expiry>:<user>", HMAC-SHA1 of it, base64."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

from app.rtc.turn import IceServer, ice_servers, turn_credential, url_list
from app.settings import Settings

USER = uuid.UUID("0191d3a4-5c2e-7b6f-9a1d-3e4f5a6b7c8d")


def test_the_credential_is_the_base64_hmac_sha1_of_the_username() -> None:
    username = f"1767225600:{USER}"
    digest = hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest()
    assert turn_credential("s3cret", username) == base64.b64encode(digest).decode()
    assert len(base64.b64decode(turn_credential("s3cret", username))) == 20  # SHA-1
    assert turn_credential("other", username) != turn_credential("s3cret", username)


def test_credentials_expire_after_the_setting() -> None:
    settings = Settings(turn_urls="turn:t.example:3478", turn_secret="s3cret", turn_credential_seconds=900)
    [turn] = ice_servers(settings, USER, now=1_767_225_600.7)
    assert turn.username == f"{1_767_225_600 + 900}:{USER}"
    assert turn.credential == turn_credential("s3cret", turn.username)


def test_stun_alone_and_nothing_at_all() -> None:
    assert ice_servers(Settings(stun_urls=" stun:s.example:3478 ,"), USER) == [IceServer(urls=["stun:s.example:3478"])]
    assert ice_servers(Settings(turn_urls="turn:t.example:3478"), USER) == []  # no secret: no usable TURN
    assert ice_servers(Settings(), USER) == []
    assert url_list("a, ,b,") == ["a", "b"]
