"""The client's address: the one rule every per-address limit, log and audit uses.

The peer of the TCP connection is the client, unless that peer is one of TRUSTED_PROXIES: then the
client is the right-most address of X-Forwarded-For that is not a trusted proxy (each proxy appends
the peer it saw, so everything left of that is whatever the client chose to send). Addresses are compared
without their ports and brackets, and an IPv4-mapped IPv6 peer is its IPv4 address. uvicorn's own
forwarded-header handling is off (app/__main__.py), so this is the only place that believes the header.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any

from litestar.connection import ASGIConnection

from app.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN = "unknown"


@lru_cache(maxsize=8)
def trusted_networks(spec: str) -> tuple[Network, ...]:
    """TRUSTED_PROXIES ("10.0.0.1, 10.1.0.0/16, ::1") as networks; a malformed entry fails at start-up."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in spec.split(",") if item.strip())


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def parse_address(text: str) -> Address | None:
    """An address as peers and proxies write it: "ip", "ip:port", "[v6]" or "[v6]:port"; an IPv4 address seen
    through a dual-stack listener ("::ffff:10.0.0.5") is that IPv4 address. None for anything else."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text, closed, rest = text[1:].partition("]")
        if not closed or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
    elif text.count(":") == 1:  # IPv4 with a port (a bare IPv6 address has two colons at least)
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(connection: ASGIConnection[Any, Any, Any, Any], settings: Settings) -> str:
    client = connection.scope.get("client")
    peer = parse_address(str(client[0])) if client else None
    if peer is None:
        return str(client[0]) if client and client[0] else UNKNOWN
    networks = trusted_networks(settings.trusted_proxies)
    if not any(peer in network for network in networks):
        return str(peer)
    hops = [hop.strip() for line in connection.headers.getall("x-forwarded-for", [])
            for hop in line.split(",") if hop.strip()]
    address = peer
    for hop in reversed(hops):
        ip = parse_address(hop)
        if ip is None:
            # Every hop right of this one is a proxy of ours, so one of them wrote it: it is the client, as that
            # proxy names it ("unknown", an obfuscated id). Skipping it would believe what the client wrote
            # further left; stopping at the proxy would put every client in the proxy's own bucket.
            return hop if _TOKEN.fullmatch(hop) else UNKNOWN
        address = ip
        if not any(ip in network for network in networks):
            return str(ip)
    return str(address)  # every hop is a proxy of ours: the left-most is the closest we know to the client
