"""Pushes through FCM: firebase-admin's real send path, a real OAuth exchange, against the loopback stand-in,
both plain HTTP/1.1 and as Google serves it (HTTP/2 over TLS, its certificate trusted through FCM_CA_FILE)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import firebase_admin
import msgspec
import pytest
from firebase_admin import messaging

from app.notifications.fcm import FcmHttpClient, FcmPush
from app.notifications.push import TITLES, LogPush, Outcome, PushMessage, PushTarget, push_sender, token_hash
from app.settings import Settings
from tests.standins.fcm import FcmStandin
from tests.standins.fixtures import FcmFixture


def target(token: str, platform: str = "android") -> PushTarget:
    return PushTarget(device_id=uuid.uuid4(), user_id=uuid.uuid4(), platform=platform, push_token=token)


def new_message(ref: str = "m1") -> PushMessage:
    return PushMessage(type="message.new", ref=ref, collapse_key=f"message.new:{ref}")


def call(ref: str = "c1", ttl: int | None = None) -> PushMessage:
    return PushMessage(type="call.incoming", ref=ref, collapse_key=f"call:{ref}", urgent=True, ttl_seconds=ttl)


@pytest.fixture(params=["http1", "h2-tls"])
def fcm_standin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FcmFixture]:
    """Every test here against both stand-ins: plain HTTP/1.1, and HTTP/2 over TLS as FCM speaks."""
    standin = FcmFixture(tmp_path, tls=request.param == "h2-tls")
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture
def settings(tmp_path: Path, fcm_standin: FcmFixture) -> Settings:
    return fcm_standin.settings(Settings(data_dir=str(tmp_path), call_ring_seconds=45))


@pytest.fixture
async def fcm(settings: Settings) -> AsyncIterator[FcmPush]:
    sender = push_sender(settings)
    inner = getattr(sender, "fcm", sender)  # FCM alone is routed too (APNs unset)
    assert isinstance(inner, FcmPush)
    yield inner
    await sender.aclose()


async def test_a_push_reaches_fcm_after_a_real_token_exchange(fcm: FcmPush, fcm_standin: FcmFixture) -> None:
    assert await fcm.send([(new_message(), target("tok-1"))]) == [Outcome.SENT]
    assert await fcm.send([(new_message("m2"), target("tok-2"))]) == [Outcome.SENT]

    assert len(fcm_standin.token_requests) == 1  # one exchange, the access token reused
    claims = fcm_standin.token_requests[0]
    assert claims["iss"] == fcm_standin.client_email
    assert "https://www.googleapis.com/auth/firebase.messaging" in claims["scope"] or \
        "https://www.googleapis.com/auth/cloud-platform" in claims["scope"]
    assert fcm_standin.refused_auth == 0
    first = fcm_standin.requests[0]
    assert first.path == f"/v1/projects/{fcm_standin.project_id}/messages:send"
    assert first.headers["authorization"].startswith("Bearer ya29.")
    assert first.headers["x-firebase-client"].startswith("fire-admin-python/")
    assert first.http_version == ("2" if fcm_standin.tls else "1.1")


async def test_over_tls_every_push_is_a_stream_of_one_http2_connection(tmp_path: Path) -> None:
    standin = FcmFixture(tmp_path, tls=True).start()
    sender = FcmPush(standin.settings(Settings(data_dir=str(tmp_path), fcm_timeout_seconds=60)))
    try:
        pushes = [(new_message(f"m{i}"), target(f"tok-{i}")) for i in range(300)]
        assert await sender.send(pushes) == [Outcome.SENT] * 300
        assert await sender.send(pushes[:10]) == [Outcome.SENT] * 10
    finally:
        await sender.aclose()
        standin.stop()
    assert {r.http_version for r in standin.requests} == {"2"}
    assert standin.h2_connections == 1
    assert len(standin.token_requests) == 1


async def test_no_more_streams_at_once_than_the_server_allows(tmp_path: Path) -> None:
    # past its SETTINGS_MAX_CONCURRENT_STREAMS the stand-in, as h2 does, ends the connection: every push would fail
    standin = FcmStandin(tls=True, directory=tmp_path, max_streams=5).start()
    credentials = tmp_path / "sa.json"
    sender = FcmPush(standin.settings(Settings(data_dir=str(tmp_path), fcm_timeout_seconds=60), credentials))
    try:
        pushes = [(new_message(f"m{i}"), target(f"tok-{i}")) for i in range(60)]
        assert await sender.send(pushes) == [Outcome.SENT] * 60
    finally:
        await sender.aclose()
        standin.stop()
    assert standin.h2_connections == 1


async def test_a_lost_connection_is_a_retry_for_its_pushes_and_the_next_send_connects_again(
        tmp_path: Path) -> None:
    standin = FcmFixture(tmp_path, tls=True).start()
    sender = FcmPush(standin.settings(Settings(data_dir=str(tmp_path))))
    try:
        assert await sender.send([(new_message(), target("tok-1"))]) == [Outcome.SENT]
        hold = standin.hold_sends()
        sending = asyncio.create_task(sender.send([(new_message(f"m{i}"), target(f"held-{i}")) for i in range(3)]))
        await asyncio.to_thread(hold.wait_arrived, 3)
        standin.drop_connections()
        assert await sending == [Outcome.RETRY] * 3  # their answers are lost: FCM may have delivered them
        standin.stop_holding()
        assert await sender.send([(new_message("m9"), target("tok-9"))]) == [Outcome.SENT]
    finally:
        await sender.aclose()
        standin.stop()
    assert standin.h2_connections == 2


async def test_without_fcm_ca_file_an_unknown_authority_is_refused(tmp_path: Path) -> None:
    standin = FcmFixture(tmp_path, tls=True).start()
    settings = standin.settings(Settings(data_dir=str(tmp_path)))
    assert settings.fcm_ca_file == str(standin.ca_file)
    untrusting = FcmPush(msgspec.structs.replace(settings, fcm_ca_file=None))
    try:
        assert await untrusting.send([(new_message(), target("tok"))]) == [Outcome.RETRY]  # the token exchange
        assert standin.token_requests == []
        # a token got elsewhere: the send itself refuses the stand-in's certificate too
        trusting = FcmPush(settings)
        try:
            assert await trusting.send([(new_message(), target("tok"))]) == [Outcome.SENT]
            untrusting._credential.token = trusting._credential.token
            untrusting._credential.expiry = trusting._credential.expiry
            assert await untrusting.send([(new_message("m2"), target("tok-2"))]) == [Outcome.RETRY]
        finally:
            await trusting.aclose()
    finally:
        await untrusting.aclose()
        standin.stop()
    assert [r.token for r in standin.requests] == ["tok"]


async def test_a_refused_access_token_is_a_retry_and_the_next_send_exchanges_again(
        fcm: FcmPush, fcm_standin: FcmFixture) -> None:
    assert await fcm.send([(new_message(), target("tok-1"))]) == [Outcome.SENT]
    fcm_standin.revoke_access_tokens()

    assert await fcm.send([(new_message("m2"), target("tok-2"))]) == [Outcome.RETRY]
    assert await fcm.send([(new_message("m3"), target("tok-3"))]) == [Outcome.SENT]

    assert len(fcm_standin.token_requests) == 2
    assert [r.token for r in fcm_standin.requests] == ["tok-1", "tok-3"]


async def test_a_message_push_is_a_neutral_notification_with_ids_only(
        fcm: FcmPush, fcm_standin: FcmFixture) -> None:
    assert await fcm.send([(new_message("m7"), target("tok-n", "ios"))]) == [Outcome.SENT]

    sent = fcm_standin.requests[0].message
    assert sent["token"] == "tok-n"
    assert sent["data"] == {"type": "message.new", "ref": "m7"}
    assert sent["notification"] == {"title": TITLES["message.new"]}
    assert sent["android"]["collapse_key"] == "message.new:m7"
    assert sent["apns"]["headers"]["apns-collapse-id"] == "message.new:m7"
    assert set(sent) == {"token", "data", "notification", "android", "apns"}


async def test_a_call_is_a_high_priority_data_message_within_the_ring_window(
        fcm: FcmPush, fcm_standin: FcmFixture, settings: Settings) -> None:
    assert await fcm.send([(call("c1", ttl=600), target("tok-a")), (call("c2", ttl=20), target("tok-b"))]) == [
        Outcome.SENT, Outcome.SENT]

    by_ref = {r.message["data"]["ref"]: r.message for r in fcm_standin.requests}
    long, short = by_ref["c1"], by_ref["c2"]
    for sent in (long, short):
        assert "notification" not in sent  # a data message: the app rings itself
        assert sent["data"]["type"] == "call.incoming"
        assert set(sent["data"]) == {"type", "ref"}
        assert sent["android"]["priority"] == "high"
        assert int(sent["android"]["ttl"].removesuffix("s")) <= settings.call_ring_seconds
        assert sent["android"]["collapse_key"] == f"call:{sent['data']['ref']}"
    assert long["android"]["ttl"] == f"{settings.call_ring_seconds}s"
    assert short["android"]["ttl"] == "20s"


async def test_provider_answers_become_outcomes(fcm: FcmPush, fcm_standin: FcmFixture) -> None:
    answers = {"dead": "unregistered", "malformed": "invalid_argument", "other-project": "sender_id_mismatch",
               "busy": "unavailable", "broken": "internal", "throttled": "quota", "lost": "lose",
               "bad-payload": "invalid_payload"}
    for token, answer in answers.items():
        fcm_standin.answer_token(token, answer)
    tokens = ["fine", *answers]

    outcomes = await fcm.send([(new_message(), target(t)) for t in tokens])

    assert dict(zip(tokens, outcomes, strict=True)) == {
        "fine": Outcome.SENT, "dead": Outcome.GONE, "malformed": Outcome.GONE, "other-project": Outcome.GONE,
        "busy": Outcome.RETRY, "broken": Outcome.RETRY, "throttled": Outcome.RETRY, "lost": Outcome.RETRY,
        "bad-payload": Outcome.FAILED}
    # one attempt each: retrying is the outbox's business (same collapse key), not the client's
    assert sorted(fcm_standin.tokens()) == sorted(tokens)


async def test_a_held_send_waits_and_a_lost_answer_is_a_retry(fcm: FcmPush, fcm_standin: FcmFixture) -> None:
    hold = fcm_standin.hold_sends()
    sending = asyncio.create_task(fcm.send([(new_message(), target("tok-h"))]))
    await asyncio.to_thread(hold.wait_arrived)
    assert not sending.done()
    hold.release()
    assert await sending == [Outcome.SENT]

    lost = fcm_standin.hold_sends(lose=True)
    sending = asyncio.create_task(fcm.send([(new_message(), target("tok-l"))]))
    await asyncio.to_thread(lost.wait_arrived)
    lost.release()
    assert await sending == [Outcome.RETRY]  # FCM may have delivered it: the retry collapses on the phone
    fcm_standin.stop_holding()


async def test_more_than_one_batch_goes_out_in_batches_of_500(tmp_path: Path, fcm_standin: FcmFixture) -> None:
    # a generous timeout: 500 requests through 100 connections to a threaded stand-in on a busy machine
    fcm = FcmPush(fcm_standin.settings(Settings(data_dir=str(tmp_path), fcm_timeout_seconds=120)))
    try:
        pushes = [(new_message(f"m{i}"), target(f"tok-{i}")) for i in range(501)]
        assert await fcm.send(pushes) == [Outcome.SENT] * 501  # send_each_async refuses a list over 500
    finally:
        await fcm.aclose()
    assert len(fcm_standin.requests) == 501


async def test_an_unreachable_token_endpoint_is_a_retry(tmp_path: Path, fcm_standin: FcmFixture) -> None:
    settings = fcm_standin.settings(Settings(data_dir=str(tmp_path)))
    path = Path(settings.fcm_credentials or "")
    account = json.loads(path.read_text())
    path.write_text(json.dumps({**account, "token_uri": "http://127.0.0.1:9/token"}))  # nothing listens there
    sender = FcmPush(settings)
    try:
        assert await sender.send([(new_message(), target("tok"))]) == [Outcome.RETRY]
    finally:
        await sender.aclose()
    assert fcm_standin.requests == []


def test_the_private_seam_of_firebase_admin_is_where_it_was(settings: Settings, fcm_standin: FcmFixture) -> None:
    """firebase-admin has no endpoint setting for messaging: we set `_fcm_url` and `_async_client` on its
    messaging service. If an upgrade moves them, this fails here rather than pushes silently going to Google."""
    assert firebase_admin.__version__.startswith("7.7."), firebase_admin.__version__
    assert messaging._MessagingService.FCM_URL == "https://fcm.googleapis.com/v1/projects/{0}/messages:send"
    sender = FcmPush(settings)
    try:
        service = messaging._get_messaging_service(sender.app)
        assert isinstance(service, messaging._MessagingService)
        assert service._fcm_url == f"{fcm_standin.url}/v1/projects/{fcm_standin.project_id}/messages:send"
        assert isinstance(service._async_client, FcmHttpClient)
        assert service._async_client is sender.client
        assert service._credential is sender._credential
        assert isinstance(service._fcm_headers, dict)
    finally:
        asyncio.run(sender.aclose())


async def test_without_providers_pushes_are_json_lines_in_the_log(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path))
    sender = push_sender(settings)
    assert isinstance(sender, LogPush)
    outcomes = await asyncio.gather(*(sender.send([(new_message(f"m{i}"), target(f"secret-{i}", "ios")),
                                                   (call(f"c{i}"), target(f"secret-c{i}"))]) for i in range(20)))
    assert all(o == [Outcome.SENT, Outcome.SENT] for o in outcomes)
    await sender.aclose()

    text = (tmp_path / "push.log").read_text()
    assert "secret-" not in text  # the token is hashed
    lines = [json.loads(line) for line in text.splitlines()]  # whole lines, every one parses
    assert len(lines) == 40
    first = next(line for line in lines if line["ref"] == "m0")
    assert first["type"] == "message.new"
    assert first["title"] == TITLES["message.new"]
    assert first["platform"] == "ios"
    assert first["token_hash"] == token_hash("secret-0")
    assert next(line for line in lines if line["ref"] == "c3")["urgent"] is True
