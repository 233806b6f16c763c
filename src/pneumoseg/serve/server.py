"""HTTP server for a model package: SageMaker's bring-your-own-container contract on a port of your choice.

::

    python -m pneumoseg.serve --model output/demo/06_package/model.tar.gz --port 8080
    curl -s localhost:8080/ping
    curl -s -H "Content-Type: application/dicom" --data-binary @image.dcm localhost:8080/invocations

``GET /ping`` answers 200 once the model is loaded (503 before); ``POST /invocations`` runs the handler of
:mod:`pneumoseg.serve.handler` on the body (its ``Content-Type`` and ``Accept`` choose the decoder and the response).
``--model`` takes a ``model.tar.gz`` or the folder it extracts to; in a SageMaker container that is
``--model /opt/ml/model --host 0.0.0.0 --port 8080``.

Built on the standard library, as one event loop and a bounded pool of worker threads:

* The loop accepts connections and watches the idle ones (keep-alive, HTTP/1.1), so an idle connection holds no
  thread; it is closed after ``--keep-alive`` seconds. Beyond ``--max-connections`` open connections, a new one
  is answered 503 at once.
* A connection with bytes to read goes to one of ``--workers`` threads, which reads one request, answers it and
  hands the connection back. A client has ``--request-timeout`` seconds to send a whole request once it starts
  (408 after that), so a slow or stalled client cannot hold a worker for longer.
* ``--predictions`` requests predict at once (default 1: one prediction uses every core, or the GPU); the
  others decode their bodies meanwhile and wait their turn.
* ``Expect: 100-continue`` is answered before the body is sent: ``100 Continue``, or at once the final 413
  (``Content-Length`` over ``--max-body-mb``), 415 (an unsupported ``Content-Type``) or 404. Without it, such a
  request is answered the same way and its connection closed after the rest of its body is drained.
* Every answer but 200 is JSON ``{"error": reason, "status": code}``: 400 for an empty or unreadable body
  (corrupt DICOM, truncated PNG, ...), 406 for an unsupported ``Accept``, 500 for a failure of the model, which is
  logged with its traceback; no request can stop the server.
* One log line per request: client, request line, status, bytes in and out, milliseconds from arrival to answer.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Callable

from pneumoseg import __version__
from pneumoseg.cli import setup_logging
from pneumoseg.errors import PneumosegError
from pneumoseg.serve.package import ServingModel, load_package, open_package
from pneumoseg.serve.handler import (JSON, RequestError, check_content_type, input_fn, negotiate,
                                     output_fn, predict_fn)

log = logging.getLogger(__name__)

PING = "/ping"
INVOCATIONS = "/invocations"
# After answering a request whose body was left unread, the rest of it is read and dropped for at most this
# long before closing: closing with unread data resets the connection, and the client could lose the answer.
DRAIN_SECONDS = 2.0
_MAX_LINE = 8192


@dataclass(frozen=True)
class ServerSettings:
    """How the server takes requests (see the module docstring).

    Attributes:
        host: address to listen on (``0.0.0.0`` for every interface, as in a container).
        port: TCP port; 0 picks a free one.
        workers: threads that read, predict and answer requests.
        predictions: requests predicting at once.
        max_body_bytes: larger request bodies are answered 413.
        keep_alive: seconds an idle connection stays open.
        request_timeout: seconds a client has to send a whole request once it has started, and to take an answer.
        max_connections: open connections at most; more are answered 503.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 8
    predictions: int = 1
    max_body_bytes: int = 32 * 2 ** 20
    keep_alive: float = 60.0
    request_timeout: float = 30.0
    max_connections: int = 256


@dataclass
class Reply:
    """An HTTP answer; ``close`` ends the connection after it (the request's body may be unread)."""

    status: int
    body: bytes
    content_type: str = JSON
    close: bool = False


def error_reply(status: int, message: str, close: bool = False) -> Reply:
    """A JSON error answer: ``{"error": message, "status": status}``."""
    return Reply(int(status), json.dumps({"error": message, "status": int(status)}).encode(), JSON, close)


class InferenceService:
    """The handler behind the HTTP layer: ``/ping`` and ``/invocations`` as replies; it never raises.

    Args:
        predictions: requests predicting at once.

    Attributes:
        model: the loaded package; None until it is loaded (both endpoints answer 503 meanwhile).
    """

    def __init__(self, predictions: int = 1) -> None:
        self.model: ServingModel | None = None
        self._slots = threading.BoundedSemaphore(predictions)

    def ping(self) -> Reply:
        model = self.model
        if model is None:
            return error_reply(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading")
        return Reply(HTTPStatus.OK, json.dumps({"status": "ready", "model": model.name,
                                                "version": model.version}).encode())

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> Reply:
        """Decode ``body``, predict and encode the answer as ``accept`` asks."""
        model = self.model
        if model is None:
            return error_reply(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; retry when GET /ping "
                                                               "answers 200")
        try:
            negotiate(accept)  # an unacceptable Accept is refused before the prediction, not after it
            data = input_fn(body, content_type)
            with self._slots:
                result = predict_fn(data, model)
            payload, response_type = output_fn(result, accept)
        except RequestError as exc:
            return error_reply(exc.status, str(exc))
        except Exception as exc:  # a failure of the model must not take the server down: answer 500, log it
            log.exception("prediction failed")
            return error_reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                               f"the model failed on this request ({type(exc).__name__}); see the server's log")
        return Reply(HTTPStatus.OK, payload, response_type)


class _SocketReader(io.RawIOBase):
    """A connection's reads, bounded by the current request's ``deadline`` (monotonic seconds)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = math.inf
        self.nonblocking = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        if self.nonblocking:
            self.sock.settimeout(0.0)
            try:
                return self.sock.recv_into(buffer)
            except BlockingIOError:
                return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client took too long to send its request")
        self.sock.settimeout(None if math.isinf(remaining) else remaining)
        return self.sock.recv_into(buffer)


class _SocketWriter(io.RawIOBase):
    """A connection's writes: each whole, within ``timeout`` seconds (a client that stops reading is dropped)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self.sock = sock
        self.timeout = timeout

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)
        return len(data)


class _Connection:
    """One client connection, kept across its requests with its read buffer.

    Args:
        sock: the accepted socket.
        address: the client's address.
        on_close: called once when the connection closes (frees its slot).
        write_timeout: seconds allowed for writing one answer.
    """

    def __init__(self, sock: socket.socket, address, on_close: Callable[[], None], write_timeout: float) -> None:
        self.sock = sock
        self.address = address
        self.reader = _SocketReader(sock)
        self.rfile = io.BufferedReader(self.reader, 64 * 1024)
        self.wfile = _SocketWriter(sock, write_timeout)
        self.ready_at = time.perf_counter()
        self.drain_on_close = False
        self._on_close = on_close
        self._closed = False

    def has_pending(self) -> bool:
        """Whether bytes of a next request are already here (read ahead into the buffer, or on the socket)."""
        self.reader.nonblocking = True
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False
        finally:
            self.reader.nonblocking = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.drain_on_close:
                self._drain()
            self.sock.close()
        finally:
            self._on_close()

    def _drain(self) -> None:
        """Stop writing, then read and drop what the client still sends, for at most :data:`DRAIN_SECONDS`."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + DRAIN_SECONDS
            while (remaining := end - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                if not self.sock.recv(1 << 16):
                    return
        except OSError:  # the client is gone or too slow: nothing more to wait for
            pass


class _RequestHandler(BaseHTTPRequestHandler):
    """Reads and answers one request of a :class:`_Connection`; the server keeps the connection between requests."""

    protocol_version = "HTTP/1.1"
    # A request line without a valid version is answered with a status line and headers, not as HTTP/0.9 (a bare
    # body), which no client of this server speaks.
    default_request_version = "HTTP/1.0"
    server_version = f"pneumoseg/{__version__}"
    server: "ModelServer"

    def setup(self) -> None:
        conn: _Connection = self.request
        self.connection = conn.sock
        self.rfile, self.wfile = conn.rfile, conn.wfile
        self.received = 0

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        """Nothing to close: the connection outlives the request."""

    def _route(self) -> str:
        return self.path.split("?", 1)[0]

    def do_GET(self) -> None:
        if self._route() == PING:
            reply = self.server.service.ping()
        else:
            reply = error_reply(HTTPStatus.NOT_FOUND, f"no endpoint GET {self._route()}; use GET {PING} or POST "
                                                      f"{INVOCATIONS}")
        if self._declares_body():  # left unread: close rather than take it for the next request
            reply.close = True
        self._send(reply)

    def _declares_body(self) -> bool:
        return self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers

    def do_POST(self) -> None:
        rejection = self._rejection()
        if rejection is not None:
            self._send(rejection)
            return
        body = self._read_body()
        if isinstance(body, Reply):
            self._send(body)
            return
        self.received = len(body)
        self._send(self.server.service.invoke(body, self.headers.get("Content-Type"), self.headers.get("Accept")))

    def handle_expect_100(self) -> bool:
        """Answer ``Expect: 100-continue`` with the final answer when the headers alone decide it, else 100."""
        rejection = self._rejection() if self.command == "POST" else None
        if rejection is not None:
            self._send(rejection)
            return False
        return super().handle_expect_100()

    def _rejection(self) -> Reply | None:
        """The answer a POST gets from its headers alone (its body unread), or None when the body is wanted."""
        if self._route() != INVOCATIONS:
            return error_reply(HTTPStatus.NOT_FOUND, f"no endpoint POST {self._route()}; use POST {INVOCATIONS} or "
                                                     f"GET {PING}", close=True)
        limit = self.server.settings.max_body_bytes
        length = self.headers.get("Content-Length", "").strip()
        if length.isdigit() and int(length) > limit:
            return error_reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {int(length)} bytes, more than "
                                                                    f"the {limit} this server accepts", close=True)
        try:
            check_content_type(self.headers.get("Content-Type"))
        except RequestError as exc:
            return error_reply(exc.status, str(exc), close=True)
        return None

    def _read_body(self) -> bytes | Reply:
        """The request's body, or the error answer when it cannot be read whole within the limits."""
        encoding = self.headers.get("Transfer-Encoding", "").strip().lower()
        try:
            if encoding == "chunked":
                return self._read_chunked(self.server.settings.max_body_bytes)
            if encoding:
                return error_reply(HTTPStatus.NOT_IMPLEMENTED, f"Transfer-Encoding {encoding!r} is not supported; "
                                                               f"send a Content-Length", close=True)
            length = self.headers.get("Content-Length", "0").strip()
            if not length.isdigit():
                return error_reply(HTTPStatus.BAD_REQUEST, f"Content-Length {length!r} is not a number of bytes",
                                   close=True)
            body = self.rfile.read(int(length))
        except TimeoutError:
            return error_reply(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within "
                                                           f"{self.server.settings.request_timeout:g} s", close=True)
        if len(body) < int(length):
            return error_reply(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of its {length} bytes",
                               close=True)
        return body

    def _read_chunked(self, limit: int) -> bytes | Reply:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(_MAX_LINE)
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0 or not line.endswith(b"\n"):
                return error_reply(HTTPStatus.BAD_REQUEST, "malformed chunked body", close=True)
            if size == 0:
                break
            total += size
            if total > limit:
                return error_reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the chunked body exceeds the {limit} "
                                                                        f"bytes this server accepts", close=True)
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.readline(_MAX_LINE).strip():
                return error_reply(HTTPStatus.BAD_REQUEST, "the chunked body is truncated or malformed", close=True)
            parts.append(chunk)
        for _ in range(100):  # trailer fields, up to the blank line that ends the request
            if self.rfile.readline(_MAX_LINE).strip() == b"":
                break
        return b"".join(parts)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the standard library (bad request line, headers too long...) as JSON."""
        reason = explain or message or HTTPStatus(code).phrase
        self._send(error_reply(code, reason, close=True))

    def _send(self, reply: Reply) -> None:
        conn: _Connection = self.request
        if reply.close:
            self.close_connection = True
            conn.drain_on_close = True
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)
        log.info('%s "%s" %d %d B in, %d B out, %.1f ms', self.client_address[0], self.requestline, reply.status,
                 self.received, len(reply.body), (time.perf_counter() - conn.ready_at) * 1000)

    def log_request(self, code="-", size="-") -> None:
        """Replaced by the one line :meth:`_send` logs."""

    def log_message(self, format: str, *args) -> None:
        log.warning("%s %s", self.client_address[0], format % args)


class ModelServer:
    """The HTTP server of an :class:`InferenceService` (see the module docstring); it listens from construction.

    Args:
        service: answers the requests.
        settings: address, limits and pool sizes.

    Raises:
        OSError: the address cannot be listened on (a port in use, say).
    """

    def __init__(self, service: InferenceService, settings: ServerSettings = ServerSettings()) -> None:
        self.service = service
        self.settings = settings
        self._listener = socket.create_server((settings.host, settings.port), backlog=128)
        self._listener.setblocking(False)
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._idle: dict[_Connection, float] = {}
        self._returned: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="pneumoseg-worker")
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self._listener.getsockname()[0]}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; then finish the requests in progress and close every connection."""
        try:
            while not self._stopping.is_set():
                # Wake at least once a second to close connections idle for too long.
                for key, _ in self._selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wakeups()
                    else:
                        self._dispatch(key.data)
                self._take_back()
                self._close_idle(time.monotonic() - self.settings.keep_alive)
        finally:
            self._listener.close()
            self._close_idle(math.inf)
            self._pool.shutdown(wait=True)
            self._take_back()  # closes what the workers handed back meanwhile
            self._selector.close()
            self._stopped.set()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to stop; returns at once (safe in a signal handler)."""
        self._stopping.set()
        self._wake()

    def shutdown(self) -> None:
        """Stop and wait until every request in progress is answered and every connection closed."""
        self.stop()
        self._stopped.wait()

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except OSError:  # the wake-up pipe is full (the loop is awake anyway) or already closed
            pass

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, say: the client waits in the backlog
                log.warning("cannot accept a connection: %s", exc)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._slots.acquire(blocking=False):
                self._refuse(sock, address)
                continue
            conn = _Connection(sock, address, self._slots.release, self.settings.request_timeout)
            self._watch(conn)

    def _refuse(self, sock: socket.socket, address) -> None:
        reply = error_reply(HTTPStatus.SERVICE_UNAVAILABLE, f"the server has its maximum of "
                                                            f"{self.settings.max_connections} connections open; retry")
        head = (f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\nContent-Type: {reply.content_type}\r\n"
                f"Content-Length: {len(reply.body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n").encode()
        try:
            sock.settimeout(1.0)
            sock.sendall(head + reply.body)
        except OSError:
            pass
        finally:
            sock.close()
        log.info('%s "-" %d 0 B in, %d B out, 0.0 ms (connection limit)', address[0], reply.status, len(reply.body))

    def _watch(self, conn: _Connection) -> None:
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._idle[conn] = time.monotonic()

    def _dispatch(self, conn: _Connection) -> None:
        self._selector.unregister(conn.sock)
        del self._idle[conn]
        conn.ready_at = time.perf_counter()
        self._pool.submit(self._serve, conn)

    def _take_back(self) -> None:
        """Watch again the connections that workers finished a request on."""
        while True:
            try:
                conn = self._returned.get_nowait()
            except queue.Empty:
                return
            if self._stopping.is_set():
                conn.close()
            else:
                self._watch(conn)

    def _close_idle(self, idle_since: float) -> None:
        for conn, since in list(self._idle.items()):
            if since <= idle_since:
                self._selector.unregister(conn.sock)
                del self._idle[conn]
                conn.close()

    def _serve(self, conn: _Connection) -> None:
        """In a worker: answer the requests that are here, then hand the connection back to the loop."""
        try:
            while True:
                conn.reader.deadline = time.monotonic() + self.settings.request_timeout
                handler = _RequestHandler(conn, conn.address, self)
                if handler.close_connection or self._stopping.is_set():
                    conn.close()
                    return
                if not conn.has_pending():
                    break
                conn.ready_at = time.perf_counter()
            conn.reader.deadline = math.inf
            self._returned.put(conn)
            self._wake()
        except Exception as exc:  # the client vanished mid-request (reset, broken pipe): nobody to answer
            log.debug("connection from %s dropped: %s", conn.address[0], exc)
            conn.close()


def parser() -> argparse.ArgumentParser:
    defaults = ServerSettings()
    result = argparse.ArgumentParser(prog="python -m pneumoseg.serve", description="Serve a pneumoseg model package "
                                     "over HTTP: GET /ping, POST /invocations (SageMaker's container contract).")
    result.add_argument("--model", required=True, help="model.tar.gz of scripts/06_package_model.py, or the folder "
                                                       "it extracts to")
    result.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s; 0.0.0.0 in "
                                                              "a container)")
    result.add_argument("--port", type=int, default=defaults.port, help="TCP port, 0 for any free one (default "
                                                                        "%(default)s)")
    result.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the models run (default: a GPU when there is one)")
    result.add_argument("--workers", type=int, default=defaults.workers,
                        help="threads reading, predicting and answering requests (default %(default)s)")
    result.add_argument("--predictions", type=int, default=defaults.predictions,
                        help="requests predicting at once (default %(default)s)")
    result.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2 ** 20,
                        help="largest request body in MiB; larger ones get 413 (default %(default)g)")
    result.add_argument("--keep-alive", type=float, default=defaults.keep_alive,
                        help="seconds an idle connection stays open (default %(default)g)")
    result.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                        help="seconds a client has to send a whole request (default %(default)g)")
    result.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections at most; more get 503 (default %(default)s)")
    return result


def main(argv: list[str] | None = None) -> int:
    """Listen, load the model in the background (``/ping`` answers 503 until it is loaded), serve until SIGTERM
    or Ctrl-C. Returns 0 after a clean stop, 1 when the model cannot be loaded or the port cannot be listened on."""
    arguments = parser()
    args = arguments.parse_args(argv)
    for name in ("workers", "predictions", "max_connections"):
        if getattr(args, name) < 1:
            arguments.error(f"--{name.replace('_', '-')} must be at least 1")
    setup_logging()
    settings = ServerSettings(host=args.host, port=args.port, workers=args.workers, predictions=args.predictions,
                              max_body_bytes=int(args.max_body_mb * 2 ** 20), keep_alive=args.keep_alive,
                              request_timeout=args.request_timeout, max_connections=args.max_connections)
    service = InferenceService(settings.predictions)
    try:
        server = ModelServer(service, settings)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    log.info("listening on %s (GET %s, POST %s); loading %s", server.url, PING, INVOCATIONS, args.model)
    failed = threading.Event()

    def load() -> None:
        try:
            with open_package(args.model) as model_dir:
                model = load_package(model_dir, args.device)
        except Exception as exc:  # any failure to load ends the server: it has nothing to serve
            # A PneumosegError says what to fix; anything else is a bug and keeps its traceback.
            log.error("cannot load the model: %s", exc, exc_info=not isinstance(exc, PneumosegError))
            failed.set()
            server.stop()
            return
        service.model = model
        predictor = model.predictor
        log.info("model %s version %s ready: %d models x %d views at %d px on %s, post-processing %s", model.name,
                 model.version, len(predictor.models), len(predictor.tta.views()), predictor.image_size,
                 predictor.device, model.postprocess)

    threading.Thread(target=load, name="pneumoseg-load", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    server.serve_forever()
    log.info("stopped")
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
