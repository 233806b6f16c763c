"""uvicorn's h11 connection with a deadline on request heads, and its protocol errors answered in JSON.

uvicorn bounds only the idle time between requests (``timeout_keep_alive``): a client that opens a connection, or
starts a request, and then sends its head a byte at a time would hold its connection for as long as it likes
(slowloris). :class:`GuardedH11Protocol` gives every request head ``header_timeout`` seconds from the connection's
opening or the request's first byte, then answers 408 and closes. All HTTP parsing stays h11's; this only adds the
timer, the JSON form of the 400 that uvicorn sends for a request h11 refuses (bad framing, a bad
``Content-Length``, a malformed chunk size, ...), and a lingering close: a connection closed with a request body
still arriving (a 413, say) is half-closed and what the client still sends is dropped unparsed for at most
:data:`LINGER_SECONDS`, because closing a socket with unread data resets it and the client would lose the answer.

Every connection also joins a :class:`ConnectionBudget`: past its limit of open connections (set below the
process's file descriptors), the connection that has waited longest for a request head or a body is closed to
make room, so that idle or slow clients can never leave the health check without a descriptor; a connection
whose request is being answered is never closed so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pneumoseg.serve.handler import error_body

log = logging.getLogger("pneumoseg.serve.server")

LINGER_SECONDS = 2.0
LOG_EVERY_SECONDS = 10.0
"""Shortest time between two log lines about shed connections or failed accepts: a flood logs a count, not a line
per connection."""


class RateLimitedCount:
    """A count of events logged as a warning at most once per :data:`LOG_EVERY_SECONDS`, with how many there were.

    Args:
        what: the events, for the log line (``"connections shed"``, say).
        hint: what the operator can do about them, appended to the line.
    """

    def __init__(self, what: str, hint: str) -> None:
        self.what, self.hint = what, hint
        self.total = 0
        self._unlogged = 0
        self._logged_at = float("-inf")

    def add(self, count: int = 1, detail: str = "") -> None:
        """Count ``count`` more events; log them (and those not logged yet) unless a line was logged lately."""
        self.total += count
        self._unlogged += count
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_SECONDS:
            log.warning(
                "%d %s (%d in all)%s; %s",
                self._unlogged,
                self.what,
                self.total,
                f": {detail}" if detail else "",
                self.hint,
            )
            self._unlogged, self._logged_at = 0, now


class ConnectionBudget:
    """The open connections, least recently active first; past ``limit``, the least recently active one that is
    waiting for a request head or body is closed (see the module docstring).

    Args:
        limit: open connections at most (the server sets it below the process's file descriptor limit).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[GuardedH11Protocol, None] = {}  # insertion order: least recently active first
        self.shed = RateLimitedCount(
            "idle or slow connections closed to keep descriptors free",
            "raise the file descriptor limit (ulimit -n) or --max-connections if these are real clients",
        )

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, connection: GuardedH11Protocol) -> None:
        """Count a new connection in, closing the least recently active waiting ones beyond the limit."""
        self._open[connection] = None
        if len(self._open) > self.limit:
            self.shed_oldest(len(self._open) - self.limit)

    def active(self, connection: GuardedH11Protocol) -> None:
        """Mark ``connection`` as the most recently active (a request head has arrived, or its answer is sent)."""
        if self._open.pop(connection, 0) is None:
            self._open[connection] = None

    def closed(self, connection: GuardedH11Protocol) -> None:
        self._open.pop(connection, None)

    def shed_oldest(self, count: int) -> int:
        """Close up to ``count`` waiting connections, least recently active first -> how many were closed."""
        victims: list[GuardedH11Protocol] = []
        for connection in self._open:
            if len(victims) == count:
                break
            if connection.waiting():
                victims.append(connection)
        for connection in victims:
            self.closed(connection)
            connection.transport.abort()
        if victims:
            self.shed.add(len(victims), f"{len(self._open)} open, limit {self.limit}")
        return len(victims)


class _LingeringClose:
    """The connection's transport, whose :meth:`close` lingers while the client may still be sending a body.

    Args:
        transport: the asyncio transport of the connection.
        protocol: the connection's protocol (its h11 state says whether a body is still arriving).
    """

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
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
        try:
            self._transport.write_eof()  # the answer is sent whole, then FIN
        except OSError:  # the client has gone already (ENOTCONN): nothing is left to linger for
            self._transport.close()
            return
        self._protocol.discard_input = True
        self._transport.resume_reading()
        self._protocol.loop.call_later(LINGER_SECONDS, self._transport.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the request-head deadline (see the module docstring).

    Args:
        header_timeout: seconds a client has to send a request's whole head.
        budget: the server's open connections, which this one joins.
        **kwargs: uvicorn's own protocol arguments (``config``, ``server_state``, ``app_state``).
    """

    def __init__(self, header_timeout: float, budget: ConnectionBudget, **kwargs) -> None:
        super().__init__(**kwargs)
        self.header_timeout = header_timeout
        self.budget = budget
        self._head_deadline: asyncio.TimerHandle | None = None
        self.discard_input = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringClose(transport, self))  # type: ignore[arg-type]
        # A fresh connection owes its first request at once: one that never sends a byte is cut off too.
        self._arm_head_deadline()
        self.budget.opened(self)

    def waiting(self) -> bool:
        """True while the connection waits for its client (a request head or body, nothing being answered): it may
        be closed to make room for another."""
        return (
            self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
            and self.conn.our_state in (h11.IDLE, h11.DONE)
            and not self.transport.is_closing()
        )

    def data_received(self, data: bytes) -> None:
        if self.discard_input:
            return
        waiting_for_head = self.conn.their_state is h11.IDLE
        if waiting_for_head and self._head_deadline is None:
            self._arm_head_deadline()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()
            if waiting_for_head:
                self.budget.active(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self.budget.closed(self)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # Until the next request's first byte, uvicorn's keep-alive timer bounds the idle connection.
        self._cancel_head_deadline()
        self.budget.active(self)  # a client just served is the last to be closed to make room
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
        self._send_error(
            HTTPStatus.REQUEST_TIMEOUT, f"the request's head did not arrive within {self.header_timeout:g} s"
        )

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn when h11 refuses a request (``msg`` is uvicorn's generic text)."""
        self._send_error(
            HTTPStatus.BAD_REQUEST,
            "the request is not valid HTTP/1.1 (its request line, a header, "
            "its Content-Length or a chunk size); nothing of it was served",
        )

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        """Answer ``status`` with a JSON body, log it like every request, and close the connection."""
        body = error_body(status, message)
        # h11 is in its error state after a refused request: the answer is framed by a fresh connection object.
        writer = h11.Connection(h11.SERVER)
        writer.receive_data(b"GET / HTTP/1.1\r\nHost: -\r\n\r\n")
        writer.next_event()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        self.transport.write(
            writer.send(h11.Response(status_code=int(status), headers=headers, reason=status.phrase.encode()))
        )
        self.transport.write(writer.send(h11.Data(data=body)) + writer.send(h11.EndOfMessage()))
        self.transport.close()
        client = self.client[0] if self.client else "-"
        log.info('%s "-" %d 0 B in, %d B out, 0.0 ms (%s)', client, int(status), len(body), message)
