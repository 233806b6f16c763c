"""uvicorn's h11 connection with a deadline on request heads, and its protocol errors answered in JSON.

uvicorn bounds only the idle time between requests (``timeout_keep_alive``): a client that opens a connection, or
starts a request, and then sends its head a byte at a time would hold its connection for as long as it likes
(slowloris). :class:`GuardedH11Protocol` gives every request head ``header_timeout`` seconds from the connection's
opening or the request's first byte, then answers 408 and closes. All HTTP parsing stays h11's; this only adds the
timer, the JSON form of the 400 that uvicorn sends for a request h11 refuses (bad framing, a bad
``Content-Length``, a malformed chunk size, ...), and a lingering close: a connection closed with a request body
still arriving (a 413, say) is half-closed and what the client still sends is dropped unparsed for at most
:data:`LINGER_SECONDS`, because closing a socket with unread data resets it and the client would lose the answer.
"""
from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pneumoseg.serve.handler import error_body

log = logging.getLogger("pneumoseg.serve.server")

LINGER_SECONDS = 2.0


class _LingeringClose:
    """The connection's transport, whose :meth:`close` lingers while the client may still be sending a body.

    Args:
        transport: the asyncio transport of the connection.
        protocol: the connection's protocol (its h11 state says whether a body is still arriving).
    """

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedH11Protocol") -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._protocol.conn.their_state is not h11.SEND_BODY or not self._transport.can_write_eof():
            self._transport.close()
            return
        self._transport.write_eof()  # the answer is sent whole, then FIN
        self._protocol.discard_input = True
        self._transport.resume_reading()
        self._protocol.loop.call_later(LINGER_SECONDS, self._transport.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the request-head deadline (see the module docstring).

    Args:
        header_timeout: seconds a client has to send a request's whole head.
        **kwargs: uvicorn's own protocol arguments (``config``, ``server_state``, ``app_state``).
    """

    def __init__(self, header_timeout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        self.discard_input = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringClose(transport, self))  # type: ignore[arg-type]
        # A fresh connection owes its first request at once: one that never sends a byte is cut off too.
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self.discard_input:
            return
        waiting_for_head = self.conn.their_state is h11.IDLE
        if waiting_for_head and self._head_deadline is None:
            self._arm_head_deadline()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # Until the next request's first byte, uvicorn's keep-alive timer bounds the idle connection.
        self._cancel_head_deadline()
        super().on_response_complete()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is not h11.IDLE:  # still answering the previous request: nothing can be sent
            self.transport.close()
            return
        self._send_error(HTTPStatus.REQUEST_TIMEOUT, f"the request's head did not arrive within "
                                                     f"{self.header_timeout:g} s")

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn when h11 refuses a request (``msg`` is uvicorn's generic text)."""
        self._send_error(HTTPStatus.BAD_REQUEST, "the request is not valid HTTP/1.1 (its request line, a header, "
                                                 "its Content-Length or a chunk size); nothing of it was served")

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        """Answer ``status`` with a JSON body, log it like every request, and close the connection."""
        body = error_body(status, message)
        # h11 is in its error state after a refused request: the answer is framed by a fresh connection object.
        writer = h11.Connection(h11.SERVER)
        writer.receive_data(b"GET / HTTP/1.1\r\nHost: -\r\n\r\n")
        writer.next_event()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        self.transport.write(writer.send(h11.Response(status_code=int(status), headers=headers,
                                                      reason=status.phrase.encode())))
        self.transport.write(writer.send(h11.Data(data=body)) + writer.send(h11.EndOfMessage()))
        self.transport.close()
        client = self.client[0] if self.client else "-"
        log.info('%s "-" %d 0 B in, %d B out, 0.0 ms (%s)', client, int(status), len(body), message)
