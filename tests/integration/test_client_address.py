"""The client's address is the real one: X-Forwarded-For counts only from TRUSTED_PROXIES.

Against the real server process (`python -m app serve`: uvicorn with the options we run it with), since it is
uvicorn's own forwarded-header handling that believed any local peer.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from redis.asyncio import Redis

from app.settings import Settings
from tests.e2e.conftest import servers


def documentation_address() -> str:
    """An address no other test (nor an earlier run sharing Redis) counts under."""
    return f"2001:db8::{secrets.randbelow(0xFFFF):x}:{secrets.randbelow(0xFFFF):x}"


@pytest.fixture(scope="module")
async def api(test_settings: Settings) -> AsyncIterator[str]:
    """One server for both sides: a peer at 127.0.0.1 is a stranger, the proxy speaks from 127.0.0.2."""
    if test_settings.redis_url:  # the peer's count lives in Redis, shared with earlier servers of this run
        redis = Redis.from_url(test_settings.redis_url)
        await redis.delete("limit:otp:ip:127.0.0.1", "limit:otp:ip:127.0.0.2")
        await redis.aclose()
    async with servers(test_settings, 1, OTP_PER_IP_PER_HOUR="3", TRUSTED_PROXIES="127.0.0.2, 10.0.0.0/8") \
            as (base,):
        yield base


async def otp_statuses(base: str, new_phone: Callable[[], str], forwarded: list[str],
                       peer: str = "127.0.0.1") -> list[int]:
    async with httpx.AsyncClient(base_url=base, transport=httpx.AsyncHTTPTransport(local_address=peer)) as http:
        return [(await http.post("/api/v1/auth/otp", json={"phone": new_phone()},
                                 headers={"X-Forwarded-For": chain})).status_code for chain in forwarded]


async def test_rotating_forwarded_for_from_an_untrusted_peer_still_hits_the_limit(
    api: str, new_phone: Callable[[], str]
) -> None:
    statuses = await otp_statuses(api, new_phone, [documentation_address() for _ in range(5)])
    assert statuses == [202, 202, 202, 429, 429]


async def test_from_a_trusted_proxy_the_right_most_untrusted_address_is_the_client(
    api: str, new_phone: Callable[[], str]
) -> None:
    client, proxy = documentation_address(), "127.0.0.2"
    # what the client wrote itself (left of its address) changes nothing: still the same client
    spoofed = await otp_statuses(api, new_phone, [f"{documentation_address()}, {client}, 10.1.2.3"
                                                  for _ in range(4)], proxy)
    # distinct clients behind our proxies are counted apart
    apart = await otp_statuses(api, new_phone, [f"{documentation_address()}, 10.9.9.9" for _ in range(4)], proxy)
    assert spoofed == [202, 202, 202, 429]
    assert apart == [202, 202, 202, 202]
