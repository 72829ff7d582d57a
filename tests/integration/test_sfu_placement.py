"""SFU nodes, their registry and placement: real node processes and in-process node apps on real HTTP, with the
registry in the real profile's Redis (the embedded profile asks the nodes directly)."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
from aiortc import RTCPeerConnection
from redis.asyncio import Redis

from app.errors import Invalid
from app.rtc.placement import LOCAL_NODE, RemoteDirectory, SfuDirectory, SfuUnavailable, sfu_directory, url_of
from app.rtc.sfu.engine import RoomFull, Sfu
from app.rtc.sfu.node import public_url, run_node
from app.settings import Settings
from tests.harness import free_port
from tests.sfu_nodes import SECRET, auth, node_process, node_server

DROP_OUT_BOUND = 20.0  # seconds a dead node may stay listed before the test fails (it takes about 3 heartbeats)


@asynccontextmanager
async def directory(settings: Settings, *urls: str, **changes: object) -> AsyncIterator[RemoteDirectory]:
    """The API's view of these nodes: through the registry in Redis when the profile has it."""
    api_settings = msgspec.structs.replace(settings, sfu_urls=",".join(urls), sfu_secret=SECRET, **changes)
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    found = sfu_directory(api_settings, redis, None)
    assert isinstance(found, RemoteDirectory)
    try:
        yield found
    finally:
        await found.aclose()
        if redis is not None:
            await redis.aclose()


async def an_offer() -> tuple[RTCPeerConnection, str]:
    """A real client's offer: one audio and one video transceiver, sendrecv (API.md "Calls")."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def until_gone(found: SfuDirectory, node: str) -> float:
    """Seconds until `node` is no longer among the live nodes."""
    started = time.monotonic()
    while node in await found.live_nodes():
        if time.monotonic() - started > DROP_OUT_BOUND:
            raise AssertionError(f"{node} still live after {DROP_OUT_BOUND}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_the_control_interface_answers_only_the_shared_secret(test_settings: Settings) -> None:
    async with node_server(test_settings) as (url, node), httpx.AsyncClient(base_url=url) as http:
        for headers in ({}, auth("wrong-secret"), auth(SECRET + "x"), {"Authorization": SECRET},
                        {"Authorization": f"Basic {SECRET}"}):
            for answer in (await http.get("/health", headers=headers),
                           await http.post("/rooms/r1/participants/p1/offer", headers=headers,
                                           json={"sdp": "v=0", "type": "offer"}),
                           await http.delete("/rooms/r1", headers=headers)):
                assert answer.status_code == 401, (headers, answer.text)
                assert answer.json()["reason"] == "not_authenticated"
        health = await http.get("/health", headers=auth())
        assert health.status_code == 200
        assert health.json() == {"node": node.name, "rooms": 0, "participants": 0, "streams": 0}
        assert url_of(node.name) == url
        assert (await http.delete("/rooms/never-made", headers=auth())).status_code == 204  # idempotent


async def test_placement_picks_the_least_loaded_live_node(test_settings: Settings) -> None:
    # heartbeats far apart: the test publishes each load itself (node.beat()), when it wants it seen
    async with node_server(test_settings, sfu_heartbeat_seconds=60.0) as (url_a, node_a), \
            node_server(test_settings, sfu_heartbeat_seconds=60.0) as (url_b, node_b), \
            directory(test_settings, url_a, url_b, sfu_heartbeat_seconds=60.0) as nodes:
        assert await nodes.live_nodes() == {node_a.name, node_b.name}
        pc, sdp = await an_offer()
        try:
            answer, kind = await nodes.offer(node_a.name, "room-1", "doctor", sdp, "offer")
            assert kind == "answer"
            assert answer.startswith("v=0")
            assert node_a.status().participants == 1
            await node_a.beat()
            await node_b.beat()
            assert await nodes.place("room-2") == node_b.name  # A has a participant, B none
            # B now has a room on its way (two participants to come): A's one participant weighs less
            assert await nodes.place("room-3") == node_a.name
        finally:
            await pc.close()
            await nodes.close_room(node_a.name, "room-1")
        assert node_a.status().rooms == 0


async def test_an_idle_cluster_spreads_its_calls(test_settings: Settings) -> None:
    async with node_server(test_settings, sfu_heartbeat_seconds=60.0) as (url_a, node_a), \
            node_server(test_settings, sfu_heartbeat_seconds=60.0) as (url_b, node_b), \
            directory(test_settings, url_a, url_b, sfu_heartbeat_seconds=60.0) as nodes:
        placed = collections.Counter([await nodes.place(f"room-{i}") for i in range(10)])
        assert placed == {node_a.name: 5, node_b.name: 5}
        if test_settings.redis_url:  # a heartbeat clears the placements counted for its node (its load shows them)
            await node_a.beat()
            assert await nodes.place("room-10") == node_a.name


async def test_a_third_participant_is_refused_with_room_full(test_settings: Settings) -> None:
    async with node_server(test_settings) as (url, node), directory(test_settings, url) as nodes:
        peers = [await an_offer() for _ in range(3)]
        try:
            for who, (_, sdp) in zip(("doctor", "patient"), peers, strict=False):
                await nodes.offer(node.name, "room-full", who, sdp, "offer")
            with pytest.raises(RoomFull) as refused:
                await nodes.offer(node.name, "room-full", "stranger", peers[2][1], "offer")
            assert refused.value.status_code == 409
            assert refused.value.extra["reason"] == "room_full"
            with pytest.raises(Invalid) as invalid:  # SDP no one could answer is the client's 422
                await nodes.offer(node.name, "room-bad", "doctor", "not sdp", "offer")
            assert invalid.value.status_code == 422
        finally:
            for pc, _ in peers:
                await pc.close()
            await nodes.close_room(node.name, "room-full")


async def test_an_unreachable_node_is_503_sfu_unavailable(test_settings: Settings) -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with directory(test_settings, gone) as nodes:
        assert await nodes.live_nodes() == set()
        with pytest.raises(SfuUnavailable) as no_node:
            await nodes.place("room-1")
        assert no_node.value.status_code == 503
        assert no_node.value.extra["reason"] == "sfu_unavailable"
        with pytest.raises(SfuUnavailable) as refused:
            await nodes.offer(f"{gone}#0badc0de", "room-1", "doctor", "v=0", "offer")
        assert refused.value.status_code == 503
        assert refused.value.extra["reason"] == "sfu_unavailable"
        await nodes.close_room(f"{gone}#0badc0de", "room-1")  # a node that is gone counts as closed


async def test_a_node_that_never_answers_is_503_not_a_hang(test_settings: Settings) -> None:
    accepted = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # reads the request, never answers
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with directory(test_settings, url, sfu_timeout_seconds=0.5) as nodes:
            with pytest.raises(SfuUnavailable) as refused:
                await nodes.offer(f"{url}#0badc0de", "room-1", "doctor", "v=0", "offer")
            assert refused.value.extra["reason"] == "sfu_unavailable"
            assert accepted.is_set()
    finally:
        server.close()


async def test_the_api_and_the_node_must_share_a_secret(test_settings: Settings,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    async with node_server(test_settings) as (url, node), \
            directory(test_settings, url) as nodes:
        nodes.http.headers["Authorization"] = "Bearer not-the-secret"  # an API configured with another secret
        with pytest.raises(SfuUnavailable):
            await nodes.offer(node.name, "room-1", "doctor", "v=0", "offer")
    with pytest.raises(ValueError, match="SFU_SECRET"):
        sfu_directory(msgspec.structs.replace(test_settings, sfu_urls="http://127.0.0.1:1"), None, None)
    assert run_node(msgspec.structs.replace(test_settings, sfu_secret=None)) == 2  # `python -m app sfu` refuses
    assert "SFU_SECRET" in capsys.readouterr().err


def test_a_node_on_every_interface_registers_its_public_url(test_settings: Settings,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    everywhere = msgspec.structs.replace(test_settings, sfu_secret=SECRET, sfu_listen="0.0.0.0:8100")
    assert run_node(everywhere) == 2  # 0.0.0.0 is no address to reach it at
    assert "SFU_PUBLIC_URL" in capsys.readouterr().err
    assert public_url(msgspec.structs.replace(everywhere, sfu_public_url="http://10.0.0.5:8100/")) == \
        "http://10.0.0.5:8100"


async def test_a_killed_node_drops_out_of_live_nodes(test_settings: Settings) -> None:
    async with node_process(test_settings, SFU_HEARTBEAT_SECONDS="1") as process, \
            node_server(test_settings, sfu_heartbeat_seconds=1.0) as (survivor, _), \
            directory(test_settings, process.url, survivor, sfu_heartbeat_seconds=1.0) as nodes:
        live = await nodes.live_nodes()
        assert {url_of(node) for node in live} == {process.url, survivor}
        [killed] = [node for node in live if url_of(node) == process.url]
        process.kill()
        await until_gone(nodes, killed)
        assert {url_of(node) for node in await nodes.live_nodes()} == {survivor}
        for _ in range(3):  # and new rooms go to the survivor only
            assert url_of(await nodes.place("room")) == survivor


async def test_a_node_stopping_cleanly_deregisters_at_once(test_settings: Settings) -> None:
    # a registration would outlive the process by three minutes: only the node's own goodbye removes it now
    async with node_process(test_settings, SFU_HEARTBEAT_SECONDS="60") as process, \
            directory(test_settings, process.url, sfu_heartbeat_seconds=60.0) as nodes:
        assert {url_of(node) for node in await nodes.live_nodes()} == {process.url}
        assert process.stop() in (0, -signal.SIGTERM)  # uvicorn ends by the signal it handled, after its shutdown
        assert await nodes.live_nodes() == set()
    if test_settings.redis_url:
        redis = Redis.from_url(test_settings.redis_url)
        try:
            assert await redis.exists(f"sfu:node:{process.url}") == 0
        finally:
            await redis.aclose()


async def test_a_node_stopping_closes_its_rooms(test_settings: Settings) -> None:
    pc, sdp = await an_offer()
    try:
        async with node_server(test_settings) as (url, node), directory(test_settings, url) as nodes:
            await nodes.offer(node.name, "room-1", "doctor", sdp, "offer")
            assert node.status().rooms == 1
        assert node.status().rooms == 0  # its shutdown (SIGTERM in a node process) closed the room
    finally:
        await pc.close()


async def test_a_restarted_node_is_another_node(test_settings: Settings) -> None:
    port = free_port()
    async with node_server(test_settings, port) as (url, first), directory(test_settings, url) as nodes:
        assert await nodes.live_nodes() == {first.name}
    async with node_server(test_settings, port) as (url, second), directory(test_settings, url) as nodes:
        assert await nodes.live_nodes() == {second.name}
        assert url_of(second.name) == url_of(first.name)
        assert second.name != first.name  # the calls placed on the first are not alive


async def test_the_embedded_profile_places_every_room_in_process(test_settings: Settings) -> None:
    local = Sfu(test_settings)
    found = sfu_directory(msgspec.structs.replace(test_settings, sfu_urls=""), None, local)
    try:
        node = await found.place("room-1")
        assert node.startswith(f"{LOCAL_NODE}#")  # this process's SFU: another process's is another node
        assert await found.live_nodes() == {node}
        pc, sdp = await an_offer()
        try:
            _, kind = await found.offer(node, "room-1", "doctor", sdp, "offer")
            assert kind == "answer"
            assert local.load().participants == 1
        finally:
            await pc.close()
        await found.close_room(node, "room-1")
        assert local.load().rooms == 0
        with pytest.raises(SfuUnavailable):
            await found.offer("http://10.0.0.5:8100#1", "room-2", "doctor", sdp, "offer")
    finally:
        await found.aclose()
        await local.close()

