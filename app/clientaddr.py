"""The client's address: the one rule every per-address limit, log and audit uses.

The peer of the TCP connection is the client, unless that peer is one of TRUSTED_PROXIES: then the
client is the right-most address of X-Forwarded-For that is not a trusted proxy (each proxy appends
the peer it saw, so everything left of that is whatever the client chose to send). uvicorn's own
forwarded-header handling is off (app/__main__.py), so this is the only place that believes the header.
"""

from __future__ import annotations

import ipaddress
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


def _is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(connection: ASGIConnection[Any, Any, Any, Any], settings: Settings) -> str:
    client = connection.scope.get("client")
    peer = str(client[0]) if client else UNKNOWN
    networks = trusted_networks(settings.trusted_proxies)
    if not networks or not _is_trusted(peer, networks):
        return peer
    hops = [hop.strip() for line in connection.headers.getall("x-forwarded-for", [])
            for hop in line.split(",")]
    address = peer
    for hop in reversed(hops):
        try:
            hop = str(ipaddress.ip_address(hop))
        except ValueError:  # not an address: nothing left of it can be believed either
            return address
        address = hop
        if not _is_trusted(hop, networks):
            return hop
    return address  # every hop is a proxy of ours: the left-most is the closest we know to the client
