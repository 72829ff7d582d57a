"""The HTTP/1.1 server protocol: uvicorn's httptools one, with a bound on a request's head.

httptools (llhttp) buffers a request line and headers of any size until they end: one connection could make
the server hold tens of megabytes of headers (measured: 52 MB of headers were read and answered 200, the
process's peak RSS 50 MB higher), and a few hundred such connections exhaust its memory. Here a head (request
line and headers) that has grown past MAX_HEAD_BYTES without ending is refused with 431 and the connection
closed; what is held for it stays within that bound plus one network read. Real heads are a few KiB (a bearer
token is under 1 KiB); proxies in front bound them tighter still (nginx: 4 buffers of 8 KiB).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
LINGER_SECONDS = 2.0

_BODY = json.dumps({"status_code": 431, "detail": "the request's headers are too large",
                    "extra": {"reason": "headers_too_large"}}).encode()
_REFUSAL = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)


class BoundedHead(HttpToolsProtocol):
    _in_head = False  # between the first byte of a request and the end of its headers
    _head_bytes = 0
    _refused = False

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering: what still comes is read and dropped, so the refusal is not lost
            return
        super().data_received(data)
        # a read after which the head is still open was all head (or the tail of the previous request, counted
        # with it: the bound is only the stricter for it)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("request headers over %d bytes: refused with 431", MAX_HEAD_BYTES)
                self._refuse()

    def _refuse(self) -> None:
        """The 431, then our side closed; closing outright with the client's bytes unread would make the kernel
        reset the connection, and the client might never read the answer. So the rest is read (and dropped)
        until the client closes, for LINGER_SECONDS at most."""
        self._refused = True
        self.transport.write(_REFUSAL)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
