"""Which host candidates a peer connection offers and which UDP ports it binds.

aioice gathers one host candidate per address of every interface, never 127.0.0.1, on an ephemeral port; that is
process-wide (`aioice.ice.get_host_addresses`). The SFU instead sets its candidates per connection
(`bind_host_candidates`): exactly RTC_HOST_ADDRESSES, on ports in RTC_UDP_PORTS (what a firewall lets through),
and never reads the process-wide list, so other peers in the same process (tests, the benchmark's clients) keep
aioice's behaviour or use `loopback_candidates()`.

Private aioice hooks (pinned in pyproject.toml, covered by tests/integration/test_sfu_media.py):
`Connection.get_component_candidates` (replaced per instance), `Connection._protocols`, `StunProtocol` (its
`datagram_received` and `local_candidate`), `aioice.ice.get_host_addresses`; aiortc's `RTCIceGatherer._connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import aioice.ice
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aiortc import RTCPeerConnection

from app.errors import Invalid, Unavailable

log = logging.getLogger("app.rtc.sfu")
_capped_warned = False


class MediaProtocol(aioice.ice.StunProtocol):
    """aioice's protocol for the SFU's sockets, with a fast path: once the connection carries SRTP, an RTP
    datagram goes straight to `fast` (the packet path, in this callback) instead of through aioice's and aiortc's
    queues and tasks; STUN, DTLS and RTCP still take aioice's way (RFC 7983 demultiplexing by the first byte)."""

    fast: Callable[[bytes], None] | None = None
    # the socket cannot take more (asyncio buffers what it refuses, without bound, and says so here): the packet
    # path drops until it drains, as a congested link would, rather than queue media that is stale by then
    paused = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        fast = self.fast
        if fast is not None and isinstance(data, bytes) and len(data) > 12 and 127 < data[0] < 192 \
                and not 192 <= data[1] <= 208:
            fast(data)
            return
        super().datagram_received(data, addr)


class PortsExhausted(Unavailable):
    default_reason = "rtc_ports_exhausted"


def parse_addresses(value: str) -> tuple[str, ...]:
    """RTC_HOST_ADDRESSES: a comma list of IP addresses (empty: every interface's, as aioice finds them)."""
    found = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            found.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise Invalid(f"RTC_HOST_ADDRESSES: {item!r} is not an IP address", "invalid_setting") from None
    return tuple(found)


def parse_ports(value: str) -> range | None:
    """RTC_UDP_PORTS: "40000-40999" (inclusive) or one port; empty: ephemeral ports."""
    value = value.strip()
    if not value:
        return None
    low, _, high = value.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        raise Invalid(f"RTC_UDP_PORTS: {value!r} is not a port range like 40000-40999", "invalid_setting") from None
    if not 1 <= first <= last <= 65535:
        raise Invalid(f"RTC_UDP_PORTS: {value!r} is not a port range like 40000-40999", "invalid_setting")
    return range(first, last + 1)


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a `size`-byte receive buffer (RTC_UDP_RCVBUF_BYTES; 0 leaves the system's default) and return what
    the kernel applied: Linux doubles the value for its bookkeeping and caps it at net.core.rmem_max, which is
    logged once so an operator can raise it."""
    global _capped_warned
    if size > 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    applied = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if size > 0 and applied < size * (2 if sys.platform == "linux" else 1) and not _capped_warned:
        _capped_warned = True
        log.warning("the SFU's UDP receive buffer is capped below RTC_UDP_RCVBUF_BYTES; raise net.core.rmem_max",
                    extra={"wanted": size, "applied": applied})
    return applied


def bind_udp(address: str, ports: range | None, rcvbuf: int = 0) -> socket.socket:
    """A UDP socket bound to address, on a free port of the range (tried from a random point, so concurrent
    connections rarely collide) or an ephemeral one, with a `rcvbuf`-byte receive buffer (0: the default)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    candidates: Sequence[int] = [0]
    if ports is not None:
        start = random.randrange(len(ports))
        candidates = [ports[(start + i) % len(ports)] for i in range(len(ports))]
    for port in candidates:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and ports is not None:
                continue
            raise
        sock.setblocking(False)
        set_receive_buffer(sock, rcvbuf)
        return sock
    raise PortsExhausted(f"no free UDP port in RTC_UDP_PORTS {ports.start}-{ports.stop - 1}")  # type: ignore[union-attr]


def bind_host_candidates(pc: RTCPeerConnection, addresses: Sequence[str], ports: range | None,
                         rcvbuf: int = 0) -> None:
    """Make pc offer exactly these host candidates (empty: aioice's own list), bound in the port range, each
    socket with a `rcvbuf`-byte receive buffer. Call it after the transceivers exist and before
    setLocalDescription (which gathers)."""
    seen: set[int] = set()
    for transceiver in pc.getTransceivers():
        gatherer = transceiver.receiver.transport.transport.iceGatherer
        connection = gatherer._connection
        if id(connection) in seen:
            continue
        seen.add(id(connection))
        _restrict(connection, tuple(addresses), ports, rcvbuf)


def _restrict(connection: aioice.ice.Connection, configured: tuple[str, ...], ports: range | None,
              rcvbuf: int) -> None:
    # aioice's signature (`timeout` is for STUN/TURN, which the SFU's own host candidates never use); `addresses`
    # is its process-wide list, used only when none is configured
    async def get_component_candidates(component: int, addresses: list[str],
                                       timeout: int = 5) -> list[Candidate]:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        candidates: list[Candidate] = []
        protocols: list[MediaProtocol] = []
        try:
            for address in configured or tuple(addresses):
                sock = bind_udp(address, ports, rcvbuf)
                try:
                    _, protocol = await loop.create_datagram_endpoint(
                        lambda: MediaProtocol(connection), sock=sock)
                except BaseException:
                    sock.close()
                    raise
                protocols.append(protocol)
                host, port = protocol.transport.get_extra_info("sockname")[:2]
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", host), component=component, transport="udp",
                    priority=candidate_priority(component, "host"), host=host, port=port, type="host")
                candidates.append(protocol.local_candidate)
        except BaseException:
            for protocol in protocols:  # nothing half-bound stays open
                protocol.transport.close()
            raise
        connection._protocols.extend(protocols)
        return candidates

    connection.get_component_candidates = get_component_candidates  # type: ignore[method-assign]  # per instance


@contextlib.contextmanager
def loopback_candidates(addresses: Sequence[str] = ("127.0.0.1",)) -> Iterator[None]:
    """For plain aiortc peers (tests, benchmark clients) on a loopback-only host: aioice offers these host
    addresses instead of the interfaces' (it never offers 127.0.0.1 itself). Process-wide while it lasts; the
    SFU's own connections are unaffected (they use `bind_host_candidates`)."""
    original = aioice.ice.get_host_addresses

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (use_ipv6 if ":" in a else use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original
