"""APNs VoIP pushes over HTTP/2 + TLS against the loopback stand-in, and the routing between FCM and APNs."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import msgspec
import pytest

from app.notifications.apns import TOKEN_REFRESH_SECONDS, ApnsVoip
from app.notifications.push import Outcome, PushMessage, PushTarget, RoutedPush, push_sender
from app.settings import Settings
from tests.standins.apns import ApnsStandin
from tests.standins.fixtures import FcmFixture, fcm_settings


def iphone(voip: str | None = "voip-1", fcm: str = "fcm-ios") -> PushTarget:
    return PushTarget(device_id=uuid.uuid4(), user_id=uuid.uuid4(), platform="ios", push_token=fcm,
                      voip_token=voip)


def call(ref: str = "c1", ttl: int | None = None) -> PushMessage:
    return PushMessage(type="call.incoming", ref=ref, collapse_key=f"call:{ref}", urgent=True, ttl_seconds=ttl)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path: Path, apns_standin: ApnsStandin) -> Settings:
    return apns_standin.settings(Settings(data_dir=str(tmp_path), call_ring_seconds=45))


@pytest.fixture
async def apns(settings: Settings) -> AsyncIterator[ApnsVoip]:
    sender = ApnsVoip(settings)
    yield sender
    await sender.aclose()


async def test_a_voip_push_carries_exactly_the_headers_apple_asks_for(
        apns: ApnsVoip, apns_standin: ApnsStandin, settings: Settings) -> None:
    before = int(time.time())
    assert await apns.send([(call("c1", ttl=600), iphone("ab12"))]) == [Outcome.SENT]
    after = int(time.time())

    [sent] = apns_standin.requests
    assert sent.method == "POST"
    assert sent.path == "/3/device/ab12"
    assert sent.body == {"aps": {}, "type": "call.incoming", "ref": "c1"}
    pushed = {k: v for k, v in sent.headers.items() if k.startswith("apns-") or k == "authorization"}
    assert set(pushed) == {"apns-push-type", "apns-topic", "apns-expiration", "apns-priority", "apns-collapse-id",
                           "authorization"}
    assert pushed["apns-push-type"] == "voip"
    assert pushed["apns-topic"] == f"{apns_standin.topic}.voip"
    assert pushed["apns-priority"] == "10"
    assert pushed["apns-collapse-id"] == "call:c1"
    # never rings past the ring window, even asked for longer
    assert before + 1 <= int(pushed["apns-expiration"]) <= after + settings.call_ring_seconds


async def test_the_provider_token_is_es256_signed_by_the_team_key(apns: ApnsVoip, apns_standin: ApnsStandin) -> None:
    assert await apns.send([(call(), iphone())]) == [Outcome.SENT]

    token = apns_standin.requests[0].headers["authorization"].removeprefix("bearer ")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    assert header["kid"] == apns_standin.key_id
    claims = jwt.decode(token, apns_standin.public_key, algorithms=["ES256"], options={"verify_iat": False})
    assert claims["iss"] == apns_standin.team_id
    assert abs(claims["iat"] - time.time()) < 3600


async def test_one_connection_and_one_token_serve_many_pushes_until_the_token_ages(
        settings: Settings, apns_standin: ApnsStandin) -> None:
    start = time.time() - TOKEN_REFRESH_SECONDS - 100  # every token signed here is still within Apple's hour
    clock = Clock(start)
    sender = ApnsVoip(settings, clock=clock)
    try:
        assert await sender.send([(call("c1"), iphone("t1"))]) == [Outcome.SENT]
        clock.now = start + 60
        assert await sender.send([(call("c2"), iphone(f"t{i}")) for i in range(2, 6)]) == [Outcome.SENT] * 4
        clock.now = start + TOKEN_REFRESH_SECONDS + 1  # past ~50 minutes: a fresh token
        assert await sender.send([(call("c3"), iphone("t6"))]) == [Outcome.SENT]
    finally:
        await sender.aclose()

    tokens = [r.headers["authorization"] for r in apns_standin.requests]
    assert len(set(tokens[:5])) == 1
    assert tokens[5] != tokens[0]
    assert [r.claims["iat"] for r in apns_standin.requests if r.claims][-1] == int(start + TOKEN_REFRESH_SECONDS + 1)
    assert all(r.status == 200 for r in apns_standin.requests)
    assert apns_standin.connections == 1  # HTTP/2 multiplexes every push onto one connection
    assert {r.connection for r in apns_standin.requests} == {0}


async def test_apns_answers_become_outcomes(apns: ApnsVoip, apns_standin: ApnsStandin) -> None:
    answers = {"gone": (410, "Unregistered"), "bad": (400, "BadDeviceToken"), "busy": (503, "ServiceUnavailable"),
               "throttled": (429, "TooManyRequests"), "broken": (500, "InternalServerError"),
               "refused": (400, "BadCollapseId")}
    for token, (status, reason) in answers.items():
        apns_standin.answer_token(token, status, reason)
    tokens = ["fine", *answers]

    outcomes = await apns.send([(call(), iphone(t)) for t in tokens])

    assert dict(zip(tokens, outcomes, strict=True)) == {
        "fine": Outcome.SENT, "gone": Outcome.VOIP_GONE, "bad": Outcome.VOIP_GONE, "busy": Outcome.RETRY,
        "throttled": Outcome.RETRY, "broken": Outcome.RETRY, "refused": Outcome.FAILED}


async def test_a_refused_provider_token_is_replaced_for_the_retry(apns: ApnsVoip, apns_standin: ApnsStandin) -> None:
    apns_standin.answer_next(403, "ExpiredProviderToken")
    assert await apns.send([(call(), iphone())]) == [Outcome.RETRY]
    first = apns.provider_token()
    assert first != apns_standin.requests[0].headers["authorization"].removeprefix("bearer ")


async def test_the_self_signed_certificate_is_trusted_only_through_apns_ca_file(
        settings: Settings, apns_standin: ApnsStandin) -> None:
    untrusting = ApnsVoip(msgspec.structs.replace(settings, apns_ca_file=None))  # the system store
    try:
        assert await untrusting.send([(call(), iphone())]) == [Outcome.RETRY]
    finally:
        await untrusting.aclose()
    assert apns_standin.requests == []


async def test_an_unreachable_apns_is_a_retry(settings: Settings) -> None:
    sender = ApnsVoip(msgspec.structs.replace(settings, apns_endpoint="https://127.0.0.1:9"))
    try:
        assert await sender.send([(call(), iphone())]) == [Outcome.RETRY]
    finally:
        await sender.aclose()


async def test_calls_to_iphones_ring_through_apns_and_everything_else_goes_through_fcm(
        tmp_path: Path, fcm_standin: FcmFixture, apns_standin: ApnsStandin) -> None:
    sender = push_sender(fcm_settings(Settings(data_dir=str(tmp_path)), fcm_standin, apns_standin))
    assert isinstance(sender, RoutedPush)
    android = PushTarget(uuid.uuid4(), uuid.uuid4(), "android", "fcm-android")
    message = PushMessage(type="message.new", ref="m1", collapse_key="message.new:m1")
    apns_standin.answer_token("voip-dead", 410, "Unregistered")
    try:
        outcomes = await sender.send([
            (call("c1"), iphone("voip-1", "fcm-ios-1")),  # APNs VoIP
            (message, iphone("voip-2", "fcm-ios-2")),  # not a call: FCM (which reaches APNs itself)
            (call("c2"), android),  # FCM, high priority
            (call("c3"), iphone(None, "fcm-ios-3")),  # no VoIP token: FCM
            (call("c4"), iphone("voip-dead", "fcm-ios-4")),  # APNs says it is gone
        ])
    finally:
        await sender.aclose()

    assert outcomes == [Outcome.SENT, Outcome.SENT, Outcome.SENT, Outcome.SENT, Outcome.VOIP_GONE]
    assert sorted(r.device_token for r in apns_standin.requests) == ["voip-1", "voip-dead"]
    assert sorted(fcm_standin.tokens()) == ["fcm-android", "fcm-ios-2", "fcm-ios-3"]
    without_voip = next(r.message for r in fcm_standin.requests if r.token == "fcm-ios-3")
    assert "notification" not in without_voip  # still a data push with ids only
    assert without_voip["apns"]["headers"]["apns-priority"] == "10"


async def test_apns_alone_still_logs_what_fcm_would_send(tmp_path: Path, apns_standin: ApnsStandin) -> None:
    sender = push_sender(apns_standin.settings(Settings(data_dir=str(tmp_path))))
    try:
        outcomes = await sender.send([(call(), iphone()), (call(), iphone(None))])
    finally:
        await sender.aclose()
    assert outcomes == [Outcome.SENT, Outcome.SENT]
    assert len(apns_standin.requests) == 1
    assert len((tmp_path / "push.log").read_text().splitlines()) == 1


async def test_a_long_collapse_key_becomes_a_stable_collapse_id_apple_accepts(
        apns: ApnsVoip, apns_standin: ApnsStandin) -> None:
    key = "call.incoming:" + "x" * 80
    message = PushMessage(type="call.incoming", ref="c9", collapse_key=key, urgent=True)
    assert await apns.send([(message, iphone()), (message, iphone())]) == [Outcome.SENT, Outcome.SENT]
    ids = {r.headers["apns-collapse-id"] for r in apns_standin.requests}
    assert len(ids) == 1  # the same on a retry
    assert len(next(iter(ids)).encode()) <= 64
