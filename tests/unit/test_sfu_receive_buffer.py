"""The SFU's media sockets get RTC_UDP_RCVBUF_BYTES as their receive buffer: checked with getsockopt on real
sockets, allowing Linux's doubling and its cap at net.core.rmem_max."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from aiortc import RTCPeerConnection

from app.rtc.sfu.ice import bind_host_candidates, bind_udp
from app.settings import Settings

WANTED = 4 * 1024 * 1024


def expected(size: int) -> int:
    """What the kernel applies for SO_RCVBUF = size: Linux doubles it and caps it at twice net.core.rmem_max."""
    if sys.platform != "linux":
        return size
    cap = int(Path("/proc/sys/net/core/rmem_max").read_text())
    return 2 * min(size, cap)


def test_the_default_is_four_mebibytes() -> None:
    assert Settings().rtc_udp_rcvbuf_bytes == WANTED


@pytest.mark.parametrize("size", [WANTED, 256 * 1024])
def test_a_bound_media_socket_has_the_receive_buffer_asked_for(size: int) -> None:
    sock = bind_udp("127.0.0.1", None, size)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == expected(size)
    finally:
        sock.close()


def test_zero_leaves_the_systems_default() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock = bind_udp("127.0.0.1", None, 0)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == default
    finally:
        sock.close()


async def test_every_socket_a_peer_connection_gathers_on_has_it() -> None:
    """Through the hook the SFU uses: the host candidates' sockets aioice keeps (`Connection._protocols`)."""
    size = 512 * 1024
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendrecv")
        bind_host_candidates(pc, ["127.0.0.1"], None, size)
        await pc.setLocalDescription(await pc.createOffer())
        connections = {id(t.receiver.transport.transport.iceGatherer._connection):
                       t.receiver.transport.transport.iceGatherer._connection for t in pc.getTransceivers()}
        sockets = [p.transport.get_extra_info("socket") for c in connections.values() for p in c._protocols]
        assert sockets
        assert [s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in sockets] == [expected(size)] * len(sockets)
    finally:
        await pc.close()
