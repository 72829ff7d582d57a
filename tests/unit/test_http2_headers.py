"""The push client's HTTP/2 header table: the bearer token is sent once a connection, not with every push, and
connection headers are still refused (callers give lower-case names: fcm.py lowers them)."""

from __future__ import annotations

import asyncio
import secrets

import h2.exceptions
import pytest

from app.notifications.http2 import _Connection

TOKEN = b"Bearer ya29." + secrets.token_urlsafe(165).encode()


def request(authorization: bytes = TOKEN) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"fcm.googleapis.com"),
            (b":path", b"/v1/projects/p/messages:send"), (b"authorization", authorization),
            (b"content-type", b"application/json")]


def header_block(connection: _Connection, headers: list[tuple[bytes, bytes]]) -> bytes:
    connection.h2.data_to_send()
    connection.h2.send_headers(connection.h2.get_next_available_stream_id(), headers, end_stream=True)
    return connection.h2.data_to_send()


async def test_the_bearer_token_is_indexed_after_the_first_request() -> None:
    connection = _Connection(asyncio.get_running_loop())
    connection.h2.initiate_connection()
    first = header_block(connection, request())
    second = header_block(connection, request())
    assert len(first) > len(TOKEN) // 2  # the token went out (Huffman-coded) once
    assert len(second) < 32  # then only indexes into the table: no token bytes at all
    assert header_block(connection, request(b"Bearer ya29.another")) != second  # a new token is sent, not reused


@pytest.mark.parametrize("bad", [(b"connection", b"keep-alive"), (b"te", b"gzip")])
async def test_headers_h2_refuses_are_still_refused(bad: tuple[bytes, bytes]) -> None:
    connection = _Connection(asyncio.get_running_loop())
    connection.h2.initiate_connection()
    with pytest.raises(h2.exceptions.ProtocolError):
        header_block(connection, [*request()[:4], bad])
