"""A small HTTP/2 client of one origin over TLS (h2 on asyncio): what FCM's pushes go out through.

Every request is a stream of one connection, opened when first needed and again after it is lost. The frames of
the requests started in one turn of the event loop leave in one write (one TLS record, one syscall), so a batch of
pushes costs a few writes rather than several per push. At most the server's SETTINGS_MAX_CONCURRENT_STREAMS are
open at once; the requests past it wait for a stream to end. Errors are httpx's (firebase-admin maps those): a
refused connection `httpx.ConnectError`, a lost one or a reset stream `httpx.RemoteProtocolError`, no answer
within the timeout `httpx.ReadTimeout`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import urllib.parse
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx

RECEIVE_WINDOW = 1 << 24  # answers are small, but many at once: no stream waits for a window update


class NoHttp2(Exception):
    """The server did not choose HTTP/2 in the TLS handshake (ALPN)."""


class _Refused(Exception):
    """The server refused the stream before processing it (REFUSED_STREAM): safe to send again at once."""


class _Stream:
    __slots__ = ("answer", "body", "headers", "status")

    def __init__(self, answer: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]]) -> None:
        self.answer = answer
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # Callers give lower-case names and no connection headers (validation still refuses any), so h2's
        # normalising pass is skipped; with it goes its rule that `authorization` is never indexed. Here nothing
        # an outsider chooses shares the connection's header table (what a push says travels in bodies), so the
        # table cannot leak the bearer token, and indexed it is sent once a connection instead of with every
        # push (~200 bytes Huffman-coded each time, measured 202 -> 76 us a request for a 220-byte token).
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, normalize_outbound_headers=False))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.unsent: dict[int, memoryview] = {}  # request bodies waiting for flow-control window
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()  # for a stream to end
        self.usable = True  # False once the server said GOAWAY or the connection was lost
        self.settled: asyncio.Future[None] = loop.create_future()  # the server's first SETTINGS arrived
        self.lost: BaseException | None = None
        self._flushing = False

    # --- asyncio ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW, h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(RECEIVE_WINDOW)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(httpx.RemoteProtocolError(f"the HTTP/2 connection was lost: {exc!r}" if exc
                                             else "the server closed the HTTP/2 connection"))

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(httpx.RemoteProtocolError(f"HTTP/2 protocol error: {exc}"))
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers or []:
                        if name == b":status":
                            stream.status = int(value)
                        else:
                            stream.headers.append((bytes(name), bytes(value)))
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body += event.data or b""
                self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._end(event.stream_id)
                if stream is not None and not stream.answer.done():
                    stream.answer.set_result((stream.status, stream.headers, bytes(stream.body)))
            elif isinstance(event, h2.events.StreamReset):
                stream = self._end(event.stream_id)
                if stream is not None and not stream.answer.done():
                    stream.answer.set_exception(
                        _Refused() if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                        else httpx.RemoteProtocolError(f"the server reset the stream ({event.error_code!r})"))
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.usable = False  # the streams it took (up to last_stream_id) still get their answers
                last = event.last_stream_id if event.last_stream_id is not None else -1
                for stream_id in [s for s in self.streams if s > last]:
                    stream = self._end(stream_id)
                    if stream is not None and not stream.answer.done():
                        stream.answer.set_exception(httpx.RemoteProtocolError("the server went away (GOAWAY)"))
                self._wake_all()
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                if not self.settled.done():
                    self.settled.set_result(None)
                self._pump()
                self._wake()
        self.flush()

    # --- requests --------------------------------------------------------------------------------
    def flush(self) -> None:
        """What h2 has to send, written now."""
        self._flushing = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush_soon(self) -> None:
        """Written at the end of this turn of the loop, with the frames of every request started in it."""
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self.flush)

    def has_room(self) -> bool:
        return len(self.streams) < self.h2.remote_settings.max_concurrent_streams  # streams awaiting answers

    async def room(self) -> None:
        while self.usable and not self.has_room():
            waiter = self.loop.create_future()
            self.waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.waiting:
                    self.waiting.remove(waiter)

    def start(self, headers: list[tuple[bytes, bytes]],
              body: bytes) -> tuple[int, asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]]]:
        stream_id = self.h2.get_next_available_stream_id()
        stream = _Stream(self.loop.create_future())
        self.streams[stream_id] = stream
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.unsent[stream_id] = memoryview(body)
            self._pump()
        self._flush_soon()
        return stream_id, stream.answer

    def cancel(self, stream_id: int) -> None:
        """The caller no longer waits (a timeout): the server is told to drop the stream."""
        if self._end(stream_id) is not None and self.lost is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed on the server's side
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._flush_soon()

    def _pump(self) -> None:
        """Request bodies out as far as the flow-control windows allow."""
        for stream_id in list(self.unsent):
            rest = self.unsent[stream_id]
            try:
                while rest:
                    size = min(len(rest), self.h2.local_flow_control_window(stream_id),
                               self.h2.max_outbound_frame_size)
                    if size <= 0:
                        break
                    self.h2.send_data(stream_id, rest[:size].tobytes(), end_stream=size == len(rest))
                    rest = rest[size:]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                rest = memoryview(b"")
            if rest:
                self.unsent[stream_id] = rest
            else:
                del self.unsent[stream_id]

    def _end(self, stream_id: int) -> _Stream | None:
        if self.unsent.pop(stream_id, None) is not None and self.lost is None:  # answered before it was all sent
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._wake()
        return stream

    def _wake(self) -> None:
        while self.waiting and self.has_room():
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self.usable = False
        if not self.settled.done():
            self.settled.set_exception(error)
        if self.lost is None:
            self.lost = error
        streams, self.streams = self.streams, {}
        self.unsent.clear()
        for stream in streams.values():
            if not stream.answer.done():
                stream.answer.set_exception(error)
        self._wake_all()

    def close(self) -> None:
        self.usable = False
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.h2.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()


class Http2Origin:
    """Requests to one https:// origin, each a stream of the one connection."""

    def __init__(self, origin: str, trust: ssl.SSLContext, timeout: float) -> None:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"an https:// origin is needed, not {origin!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.authority = parts.netloc.encode()
        self.timeout = timeout
        self.trust = trust
        trust.set_alpn_protocols(["h2"])
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._draining: set[_Connection] = set()
        self._closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            transport, connection = await loop.create_connection(
                lambda: _Connection(loop), self.host, self.port, ssl=self.trust, server_hostname=self.host,
                ssl_handshake_timeout=self.timeout)
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from exc
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            transport.close()
            raise NoHttp2(f"{self.host}:{self.port} did not agree to HTTP/2")
        try:  # its limit of concurrent streams known before the first request
            await connection.settled
        except BaseException:
            transport.close()
            raise
        return connection

    async def _usable(self) -> _Connection:
        while True:
            if self._closed:
                raise httpx.ConnectError("the client is closed")
            connection = self._connection
            if connection is not None and connection.usable:
                return connection
            if self._connecting is not None and self._connecting.done() and (
                    self._connecting.cancelled() or self._connecting.exception() is not None):
                self._connecting = None  # failed while nobody waited (their timeouts ran out): try afresh
            if self._connecting is None:  # one connect shared by every request that needs it
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            connecting = self._connecting
            try:
                self._connection = await asyncio.shield(connecting)
            finally:
                if self._connecting is connecting and connecting.done():
                    self._connecting = None
            if connection is not None and connection is not self._connection:
                if connection.streams:  # gone away (GOAWAY) with answers still to come: closed once they have
                    self._draining.add(connection)
                else:
                    connection.close()
            for old in [c for c in self._draining if not c.streams]:
                self._draining.discard(old)
                old.close()

    async def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers, body) of one request; header names in lower case."""
        try:
            async with asyncio.timeout(self.timeout):
                fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", self.authority),
                          (b":path", path.encode()), *headers]
                while True:
                    connection = await self._usable()
                    await connection.room()
                    if not connection.usable:
                        continue
                    stream_id, answer = connection.start(fields, body)
                    try:
                        return await answer
                    except _Refused:  # not processed: again, when a stream is free
                        continue
                    except asyncio.CancelledError:
                        connection.cancel(stream_id)
                        raise
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no answer from {self.host}:{self.port} within {self.timeout} s") from exc
        except h2.exceptions.ProtocolError as exc:  # e.g. the stream ids ran out: a fresh connection next time
            if self._connection is not None:
                self._connection.usable = False
            raise httpx.RemoteProtocolError(f"HTTP/2: {exc}") from exc

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            try:
                connection: Any = await self._connecting
            except BaseException:
                connection = None
            if connection is not None:
                connection.close()
        for connection in [self._connection, *self._draining]:
            if connection is not None:
                connection.close()
        self._connection = None
        self._draining.clear()
