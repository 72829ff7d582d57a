"""The metrics of calls, uploads and the SFU, read from `/metrics` as a scraper reads them, around real calls
through the API, real uploads to the profile's storage, and real aiortc media through an SFU node.

The API runs on a database of its own, so the live-calls gauge counts exactly this module's calls; the counters
are the process's, so each check compares a scrape before with one after.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.rtc.sfu.ice import loopback_candidates
from app.settings import Settings
from tests.conftest import Session, migrated_database_url, refused, running
from tests.integration.sfu_peers import WAIT, Peer
from tests.integration.test_calls import act, online_visit, start
from tests.integration.test_document_uploads import (
    complete,
    declare,
    exe_bytes,
    form,
    jpeg_bytes,
    pdf_bytes,
    uploaded,
)
from tests.integration.test_outbox_worker import own_settings
from tests.sfu_nodes import auth, node_server

METRICS_TOKEN = "metrics-test-token-0123456789"
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture(scope="module")
async def database_url(data_dir: Path) -> str:
    return await migrated_database_url(data_dir, "metrics")


@pytest.fixture(scope="module")
def test_settings(data_dir: Path, database_url: str) -> Settings:
    """The suite's settings on this module's database, with the profile's storage, METRICS_TOKEN, and the node
    watch (which counts the live calls) every 0.1 s."""
    return own_settings(data_dir, database_url, s3_endpoint_url=os.environ.get("TEST_S3_ENDPOINT_URL"),
                        s3_access_key=os.environ.get("TEST_S3_ACCESS_KEY"),
                        s3_secret_key=os.environ.get("TEST_S3_SECRET_KEY"), s3_bucket=f"clinic-{secrets.token_hex(3)}",
                        metrics_token=METRICS_TOKEN, call_node_check_seconds=0.1)


@pytest.fixture(scope="module")
async def client(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with running(test_settings) as c:
        yield c


@pytest.fixture(scope="module")
async def session_maker(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(database_url)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


class Scrape:
    """One scrape's samples, by name and labels; a series not there reads 0."""

    def __init__(self, text: str) -> None:
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


async def scrape(http: AsyncTestClient[Any] | httpx.AsyncClient, headers: dict[str, str] | None = None) -> Scrape:
    answer = await http.get("/metrics", headers=SCRAPE if headers is None else headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return Scrape(answer.text)


async def scraped_until(http: AsyncTestClient[Any] | httpx.AsyncClient, check: Callable[[Scrape], bool],
                        what: str, timeout: float = 10.0) -> Scrape:
    """Scrape until `check` holds (a gauge counted by a background pass, a counter fed by media)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await scrape(http)
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


def live(found: Scrape) -> tuple[float, float]:
    return found("clinic_calls_live", state="ringing"), found("clinic_calls_live", state="active")


# --- calls ---------------------------------------------------------------------------------------------------


async def test_a_call_rung_answered_and_ended_moves_the_call_metrics(
        client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
        visit_until: Callable[..., Any]) -> None:
    visit = await online_visit(patient, await specialist(), service, visit_until)
    before = await scraped_until(client, lambda m: live(m) == (0, 0), "no live call counted")

    rung_at = time.monotonic()
    call = await start(client, visit)
    ringing = await scraped_until(client, lambda m: live(m) == (1, 0), "one call ringing")
    assert ringing("clinic_calls_started_total") == before("clinic_calls_started_total") + 1

    accepted = await act(client, visit.patient, call["id"], "accept")
    assert accepted.status_code == 200, accepted.text
    answered_within = time.monotonic() - rung_at
    active = await scraped_until(client, lambda m: live(m) == (0, 1), "one call active")
    assert active("clinic_call_setup_seconds_count") == before("clinic_call_setup_seconds_count") + 1
    setup = active("clinic_call_setup_seconds_sum") - before("clinic_call_setup_seconds_sum")
    assert 0 < setup <= answered_within + 0.5, (setup, answered_within)  # created_at → started_at, server side
    assert active("clinic_call_setup_seconds_bucket", le="90.0") == active("clinic_call_setup_seconds_count")

    assert (await act(client, visit.doctor, call["id"], "end")).status_code == 200
    ended = await scraped_until(client, lambda m: live(m) == (0, 0), "no live call after the hang-up")
    assert ended("clinic_calls_ended_total", end_reason="completed") == \
        before("clinic_calls_ended_total", end_reason="completed") + 1

    declined = await start(client, visit)  # another ring, refused by the patient
    assert (await act(client, visit.patient, declined["id"], "decline")).status_code == 200
    after = await scrape(client)
    assert after("clinic_calls_ended_total", end_reason="declined") == \
        before("clinic_calls_ended_total", end_reason="declined") + 1
    assert after("clinic_calls_started_total") == before("clinic_calls_started_total") + 2
    assert after("clinic_call_setup_seconds_count") == before("clinic_call_setup_seconds_count") + 1  # not answered
    assert after("clinic_calls_ended_total", end_reason="completed") == \
        ended("clinic_calls_ended_total", end_reason="completed")


# --- storage -------------------------------------------------------------------------------------------------


async def test_uploads_accepted_and_refused_move_the_storage_metrics(
        client: AsyncTestClient[Any], patient: Session) -> None:
    before = await scrape(client)

    document = pdf_bytes()
    created = await uploaded(client, patient, document)
    assert (await complete(client, patient, created)).status_code == 200
    picture = jpeg_bytes()
    direct = await client.post("/api/v1/documents/upload", headers=patient.headers,
                               **form(patient, picture, "image/jpeg", "photo.jpg"))
    assert direct.status_code == 201, direct.text

    renamed = await uploaded(client, patient, exe_bytes(), filename="report.pdf")  # an executable named PDF
    refused(await complete(client, patient, renamed), 415, "type_mismatch")
    refused(await complete(client, patient, renamed), 415, "type_mismatch")  # the same refusal, counted once
    refused(await client.post("/api/v1/documents/upload", headers=patient.headers,
                              **form(patient, exe_bytes(), filename="setup.pdf")), 415, "type_mismatch")
    refused(await declare(client, patient, b"<html>", content_type="text/html", filename="x.html"), 415,
            "type_not_allowed")
    download = await client.get(f"/api/v1/documents/{direct.json()['id']}/download", headers=patient.headers,
                                follow_redirects=False)
    assert download.status_code == 307

    after = await scrape(client)

    def grew(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    assert grew("clinic_document_upload_bytes_total", path="presigned") == len(document)
    assert grew("clinic_document_upload_bytes_total", path="direct") == len(picture)
    assert grew("clinic_document_uploads_total", path="presigned") == 1
    assert grew("clinic_document_uploads_total", path="direct") == 1
    assert grew("clinic_document_uploads_rejected_total", path="presigned", reason="type_mismatch") == 1
    assert grew("clinic_document_uploads_rejected_total", path="direct", reason="type_mismatch") == 1
    assert grew("clinic_document_uploads_rejected_total", path="presigned", reason="type_not_allowed") == 1
    assert grew("clinic_document_download_urls_total") == 1


# --- the SFU -------------------------------------------------------------------------------------------------


class Viewer:
    """A client that only receives (recvonly audio and video): a subscriber that publishes nothing."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("audio", direction="recvonly")
        self.video: Any = self.pc.addTransceiver("video", direction="recvonly").receiver

    async def join(self, offer: Callable[[str], Any]) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp, type_ = await offer(self.pc.localDescription.sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=type_))

    def video_stream(self) -> tuple[int, int] | None:
        """The SSRC and highest sequence number of the video received so far (aiortc's receiver statistics)."""
        streams = self.video._RTCRtpReceiver__remote_streams
        return next(((ssrc, stats.max_seq) for ssrc, stats in streams.items()), None)


async def test_an_sfu_node_serves_what_it_forwards_and_who_is_subscribed(test_settings: Settings) -> None:
    with loopback_candidates():
        async with node_server(test_settings, rtc_host_addresses="127.0.0.1") as (url, node), \
                httpx.AsyncClient(base_url=url, timeout=5) as http:
            # the scraper's token, never the control secret
            assert (await http.get("/metrics")).status_code == 401
            assert (await http.get("/metrics", headers=auth())).status_code == 401

            def of(name: str, found: Scrape, **labels: str) -> float:
                return found(name, node=node.name, **labels)

            idle = await scrape(http)
            assert of("clinic_sfu_rooms", idle) == 0
            assert of("clinic_sfu_subscribers", idle) == 0
            doctor, viewer = Peer("doctor"), Viewer()
            try:
                await doctor.join(node.sfu, "room-metrics")
                await viewer.join(lambda sdp: node.sfu.offer("room-metrics", "viewer", sdp))
                flowing = await scraped_until(
                    http, lambda m: of("clinic_sfu_rtp_packets_forwarded_total", m, kind="video") > 0
                    and of("clinic_sfu_rtp_packets_forwarded_total", m, kind="audio") > 0, "media forwarded",
                    timeout=WAIT)
                assert of("clinic_sfu_rooms", flowing) == 1
                assert of("clinic_sfu_participants", flowing) == 2
                assert of("clinic_sfu_publishers", flowing) == 1  # the doctor; the viewer sends nothing
                assert of("clinic_sfu_subscribers", flowing) == 1  # the viewer
                assert of("clinic_sfu_streams", flowing) == 2  # the doctor's audio and video
                assert of("clinic_sfu_rtp_payload_bytes_forwarded_total", flowing, kind="video") > 0

                # the viewer's feedback: a NACK the SFU's buffer answers, one it relays, a PLI
                stream = viewer.video_stream()
                assert stream is not None
                ssrc, last_seq = stream
                await viewer.video._send_rtcp_nack(ssrc, [last_seq])
                await viewer.video._send_rtcp_nack(ssrc, [(last_seq + 200) & 0xFFFF])  # not sent yet
                await viewer.video._send_rtcp_pli(ssrc)
                fed_back = await scraped_until(
                    http, lambda m: of("clinic_sfu_nacks_received_total", m) >= 2
                    and of("clinic_sfu_retransmissions_total", m) >= 1
                    and of("clinic_sfu_nacks_relayed_total", m) >= 1
                    and of("clinic_sfu_plis_received_total", m) >= 1
                    and of("clinic_sfu_plis_sent_total", m) >= 1, "the feedback counted")

                await node.sfu.close_room("room-metrics")
                closed = await scrape(http)
            finally:
                await viewer.pc.close()
                await doctor.close()
            assert of("clinic_sfu_rooms", closed) == 0
            assert of("clinic_sfu_participants", closed) == 0
            assert of("clinic_sfu_subscribers", closed) == 0
            assert of("clinic_sfu_publishers", closed) == 0
            # what the participants counted stays counted after they left
            for name, labels in (("clinic_sfu_rtp_packets_forwarded_total", {"kind": "video"}),
                                 ("clinic_sfu_rtp_payload_bytes_forwarded_total", {"kind": "audio"}),
                                 ("clinic_sfu_nacks_received_total", {}), ("clinic_sfu_retransmissions_total", {}),
                                 ("clinic_sfu_plis_received_total", {}), ("clinic_sfu_plis_sent_total", {})):
                assert of(name, closed, **labels) >= of(name, fed_back, **labels), name


async def test_the_sfu_inside_the_api_process_is_in_the_apis_metrics(client: AsyncTestClient[Any]) -> None:
    name = client.app.state.sfu_directory.name
    found = await scrape(client)
    assert name.startswith("local#")
    for family in ("clinic_sfu_rooms", "clinic_sfu_subscribers"):
        assert found.has(family, node=name)
    assert found.has("clinic_sfu_rtp_packets_forwarded_total", node=name, kind="video")
