"""The client-address rule on its own: which X-Forwarded-For hop is believed."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.connection import ASGIConnection

from app.clientaddr import client_address
from app.settings import Settings

PROXIES = Settings(trusted_proxies="10.0.0.0/8, 2001:db8:ffff::1")


def connection(peer: str, *forwarded: str) -> ASGIConnection[Any, Any, Any, Any]:
    headers = [(b"x-forwarded-for", line.encode()) for line in forwarded]
    return ASGIConnection({"type": "http", "client": (peer, 5000), "headers": headers})  # type: ignore[arg-type]


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # an untrusted peer's header is ignored
    ("10.1.1.1", ["198.51.100.1, 203.0.113.9"], "203.0.113.9"),  # the right-most hop the proxy saw
    ("10.1.1.1", ["198.51.100.1, 203.0.113.9, 10.2.2.2"], "203.0.113.9"),  # through a chain of ours
    ("10.1.1.1", ["198.51.100.1", "203.0.113.9"], "203.0.113.9"),  # the header given twice reads as one list
    ("10.1.1.1", ["garbage, 203.0.113.9"], "203.0.113.9"),  # junk left of the client changes nothing
    ("10.1.1.1", ["203.0.113.9, garbage"], "garbage"),  # a proxy of ours wrote it: its name for the client
    ("10.1.1.1", ["203.0.113.9, unknown, 10.2.2.2"], "unknown"),  # even behind another proxy of ours
    ("10.1.1.1", ["203.0.113.9, not/an address!"], "unknown"),  # ...not believing further left, whatever it is
    ("10.1.1.1", ["198.51.100.1, 203.0.113.9, "], "203.0.113.9"),  # an empty item is nobody's hop
    ("10.1.1.1", ["10.3.3.3, 10.2.2.2"], "10.3.3.3"),  # only proxies of ours: the farthest one
    ("10.1.1.1", [], "10.1.1.1"),
    ("2001:db8:ffff::1", ["2001:DB8::7"], "2001:db8::7"),  # IPv6, written in its canonical form
])
def test_the_right_most_untrusted_hop_is_the_client(peer: str, forwarded: list[str], client: str) -> None:
    assert client_address(connection(peer, *forwarded), PROXIES) == client


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("::ffff:10.0.0.5", ["203.0.113.9"], "203.0.113.9"),  # a dual-stack listener's view of a proxy of ours
    ("::ffff:203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # an untrusted one: the same bucket as over IPv4
    ("10.1.1.1", ["198.51.100.1:4711, 203.0.113.9:51234"], "203.0.113.9"),  # proxies that append the port
    ("10.1.1.1", ["203.0.113.9:51234, 10.2.2.2:443"], "203.0.113.9"),
    ("10.1.1.1", ["[2001:db8::7]:51234"], "2001:db8::7"),
    ("10.1.1.1", ["[2001:db8::7]"], "2001:db8::7"),
    ("10.1.1.1", ["::ffff:203.0.113.9"], "203.0.113.9"),
    ("10.1.1.1", ["[::ffff:10.2.2.2]:80"], "10.2.2.2"),  # only proxies of ours, one written mapped
    ("10.1.1.1", ["203.0.113.9, [::ffff:10.2.2.2]:80"], "203.0.113.9"),
    ("[2001:db8:ffff::1]", ["2001:db8::7"], "2001:db8::7"),
    ("10.1.1.1", ["[2001:db8::7]:port"], "unknown"),  # not an address with a port either
    ("10.1.1.1", ["203.0.113.9:1:2"], "unknown"),
])
def test_ports_brackets_and_mapped_addresses_are_read_as_the_address(peer: str, forwarded: list[str],
                                                                      client: str) -> None:
    assert client_address(connection(peer, *forwarded), PROXIES) == client


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address(connection("127.0.0.1", "198.51.100.1"), Settings()) == "127.0.0.1"
