"""Which calls' SFU nodes are gone for good (`SfuDirectory.gone`), the per-process in-process SFU, a node's refusal
reasons reaching the client, and trickled candidates through a node's control interface: real node apps on real
HTTP, the registry in the real profile's Redis (the embedded profile asks the nodes directly)."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import msgspec
import pytest
from aiortc import RTCSessionDescription
from redis.asyncio import Redis

from app.errors import Invalid
from app.rtc.placement import (
    HEARTBEAT_LIVES,
    LocalDirectory,
    SfuDirectory,
    SfuUnavailable,
    is_local,
    sfu_directory,
    url_of,
)
from app.rtc.sfu.ice import loopback_candidates
from app.settings import Settings
from tests.harness import free_port
from tests.integration.sfu_peers import Peer
from tests.integration.test_sfu_placement import an_offer, directory
from tests.sfu_nodes import node_server

HEARTBEAT = 0.1  # the API's view: a node is gone after HEARTBEAT_LIVES of these and two checks
GAP = HEARTBEAT * HEARTBEAT_LIVES
BOUND = 20.0


async def gone_within(found: SfuDirectory, node: str) -> float:
    """Seconds until `node` is reported gone (checked as the keeper does, repeatedly)."""
    started = time.monotonic()
    while node not in await found.gone({node}):
        if time.monotonic() - started > BOUND:
            raise AssertionError(f"{node} not gone after {BOUND}s")
        await asyncio.sleep(HEARTBEAT / 2)
    return time.monotonic() - started


async def never_gone(found: SfuDirectory, nodes: set[str], over: float = 3 * GAP) -> None:
    """Checked repeatedly for longer than a node takes to be gone: none of `nodes` is."""
    ends = time.monotonic() + over
    while time.monotonic() < ends:
        assert await found.gone(nodes) == set()
        await asyncio.sleep(HEARTBEAT / 2)


async def test_a_stopped_node_is_gone_only_after_two_checks_a_few_heartbeats_apart(test_settings: Settings) -> None:
    async with node_server(test_settings, sfu_heartbeat_seconds=HEARTBEAT) as (url, node), \
            directory(test_settings, url, sfu_heartbeat_seconds=HEARTBEAT) as found:
        name = node.name
        await never_gone(found, {name})
    async with directory(test_settings, url, sfu_heartbeat_seconds=HEARTBEAT) as found:
        assert await found.gone({name}) == set()  # missing once: maybe a gap
        assert await found.gone({name}) == set()  # again, but not yet a few heartbeats later
        await gone_within(found, name)  # then, missing in every check since: gone
        assert await found.gone(set()) == set()  # no live call on it any more: forgotten


async def test_a_node_that_answers_is_never_gone_even_when_the_registry_lost_it(test_settings: Settings) -> None:
    # the node heartbeats rarely: its registration, once deleted (Redis restarted empty), stays missing
    async with node_server(test_settings, sfu_heartbeat_seconds=60.0) as (url, node), \
            directory(test_settings, url, sfu_heartbeat_seconds=HEARTBEAT) as found:
        if test_settings.redis_url:
            redis = Redis.from_url(test_settings.redis_url)
            try:
                await redis.flushdb()
            finally:
                await redis.aclose()
        await never_gone(found, {node.name})
        assert await found.gone({f"{url}#00000000"}) == set()  # first check of a predecessor's name
        assert await gone_within(found, f"{url}#00000000") > 0  # its address answers with another name


async def test_a_node_missing_from_this_instances_sfu_urls_is_not_gone(test_settings: Settings) -> None:
    """A rolling deploy: another instance's longer SFU_URLS placed a call on a node this one does not list."""
    async with node_server(test_settings) as (url_a, _), node_server(test_settings) as (_, other), \
            directory(test_settings, url_a, sfu_heartbeat_seconds=HEARTBEAT) as found:
        await never_gone(found, {other.name})
        if test_settings.redis_url:  # the registry knows every node: one not there is gone
            assert await gone_within(found, "http://127.0.0.1:9#0badc0de") >= 0
        else:  # nobody can judge a node nobody lists
            await never_gone(found, {"http://127.0.0.1:9#0badc0de"})


async def test_gone_raises_when_nothing_can_be_known(test_settings: Settings) -> None:
    dead_redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1, socket_timeout=1)
    settings = msgspec.structs.replace(test_settings, sfu_urls="http://127.0.0.1:9", sfu_secret="s",
                                       sfu_heartbeat_seconds=HEARTBEAT)
    found = sfu_directory(settings, dead_redis, None)
    try:
        with pytest.raises(SfuUnavailable):
            await found.gone({"http://10.0.0.5:8100#1", "local#abcd0123"})
        assert await found.gone(set()) == set()
    finally:
        await found.aclose()
        await dead_redis.aclose()


async def test_the_in_process_sfu_is_named_per_process(test_settings: Settings) -> None:
    """Two API processes without SFU_URLS: a room lives in one of their SFUs; the other refuses its offers with a
    clear reason instead of opening a second room, and an embedded restart's old rooms are gone."""
    settings = msgspec.structs.replace(test_settings, sfu_urls="", sfu_heartbeat_seconds=HEARTBEAT)
    redis_a = Redis.from_url(test_settings.redis_url) if test_settings.redis_url else None
    redis_b = Redis.from_url(test_settings.redis_url) if test_settings.redis_url else None
    first, second = sfu_directory(settings, redis_a, None), sfu_directory(settings, redis_b, None)
    assert isinstance(first, LocalDirectory)
    assert isinstance(second, LocalDirectory)
    try:
        node = await first.place("room-1")
        assert is_local(node)
        assert node != await second.place("room-2")
        pc, sdp = await an_offer()
        try:
            with pytest.raises(SfuUnavailable) as refused:
                await second.offer(node, "room-1", "doctor", sdp, "offer")
            assert refused.value.extra["reason"] == "sfu_unavailable"
            assert "another API process" in refused.value.detail
            assert (await first.offer(node, "room-1", "doctor", sdp, "offer"))[1] == "answer"
        finally:
            await pc.close()
        await second.close_room(node, "room-1")  # not its room: left alone
        assert first.sfu.load().rooms == 1
        if redis_a is not None:  # the other instance heartbeats its SFU: alive while it runs
            await never_gone(second, {node})
        await first.aclose()
        if redis_a is not None:
            assert await gone_within(second, node) >= 0  # stopped: its registration lapsed
        else:  # no registry: another process sharing the database may run it; nobody can say it is gone
            assert await second.gone({node}) == set()
        assert await second.gone({second.name}) == set()
    finally:
        await first.aclose()
        await second.aclose()
        for redis in (redis_a, redis_b):
            if redis is not None:
                await redis.aclose()


async def test_a_nodes_known_refusal_reason_reaches_the_client(test_settings: Settings) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))  # the node's only media port, taken
    port = taken.getsockname()[1]
    try:
        async with node_server(test_settings, rtc_host_addresses="127.0.0.1", rtc_udp_ports=f"{port}-{port}") \
                as (url, node), directory(test_settings, url) as found:
            pc, sdp = await an_offer()
            try:
                with pytest.raises(SfuUnavailable) as refused:
                    await found.offer(node.name, "room-1", "doctor", sdp, "offer")
            finally:
                await pc.close()
            assert refused.value.extra["reason"] == "rtc_ports_exhausted"
            assert refused.value.status_code == 503
    finally:
        taken.close()


async def test_trickled_candidates_reach_the_node(test_settings: Settings) -> None:
    ports = "21600-21699"
    with loopback_candidates():
        async with node_server(test_settings, rtc_host_addresses="127.0.0.1", rtc_udp_ports=ports) as (url, node), \
                directory(test_settings, url) as found:
            doctor, patient = Peer("doctor"), Peer("patient")
            try:
                for peer, trickle in ((doctor, False), (patient, True)):
                    peer._setup()
                    await peer.pc.setLocalDescription(await peer.pc.createOffer())
                    full = peer.pc.localDescription.sdp
                    lines = re.findall(r"^a=(candidate:.*?)\r?$", full, flags=re.MULTILINE)
                    offered = re.sub(r"^a=(candidate:.*|end-of-candidates)\r?\n", "", full, flags=re.MULTILINE) \
                        if trickle else full
                    sdp, type_ = await found.offer(node.name, "room-t", peer.name, offered, "offer")
                    await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=type_))
                    if trickle:
                        assert lines
                        for line in lines:
                            await found.candidate(node.name, "room-t", peer.name, f"a={line}")
                        await found.candidate(node.name, "room-t", peer.name, None)
                await patient.frames_reach("video", 5)
                await doctor.frames_reach("video", 5)
                with pytest.raises(Invalid) as refused:
                    await found.candidate(node.name, "room-t", "patient", "candidate:nonsense")
                assert refused.value.extra["reason"] == "invalid_candidate"
            finally:
                await doctor.close()
                await patient.close()
                await found.close_room(node.name, "room-t")
    assert url_of(node.name) == url
