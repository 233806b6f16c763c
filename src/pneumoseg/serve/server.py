"""HTTP server for a model package: SageMaker's bring-your-own-container contract on a port of your choice.

::

    python -m pneumoseg.serve --model output/demo/06_package/model.tar.gz --port 8080
    curl -s localhost:8080/ping
    curl -s -H "Content-Type: application/dicom" --data-binary @image.dcm localhost:8080/invocations

``GET /ping`` (and ``HEAD /ping``) answers 200 once the model is loaded, 503 before; ``POST /invocations`` runs the
handler of :mod:`pneumoseg.serve.handler` on the body (its ``Content-Type`` and ``Accept`` choose the decoder and
the response). ``--model`` takes a ``model.tar.gz`` or the folder it extracts to; in a SageMaker container that is
``--model /opt/ml/model --host 0.0.0.0 --port 8080``.

Built on uvicorn (its h11 parser, the strictest about framing) and Starlette, as one event loop and a bounded
pool of threads:

* The loop parses every request and answers ``/ping`` itself; decoding runs in ``--decoders`` threads of its own,
  predicting and encoding in ``--workers`` threads (``--predictions`` of them predicting at once; PyTorch releases
  the GIL), so a slow prediction never delays a ping. A decode that takes longer than ``--decode-seconds`` is
  answered 400 at that moment (its thread finishes on its own; the readers bound their work), and while every
  decoder is still busy with such overdue decodes new requests get 503 at once: a few costly images (decode
  bombs) can hold neither the workers nor every decoder, and valid requests keep their latency. Past
  ``--max-queue`` requests waiting for a thread, more are answered 503 at once, as are ``/invocations`` requests
  past ``--max-inference`` open at once (sending their body, queued or running). The health check is never
  counted: it is answered whatever the load.
* Open connections are bounded by ``--max-connections`` (default: the process's file descriptor limit, raised to
  its hard limit at start, less a reserve of :data:`FD_RESERVE`): past it, the connection that has waited longest
  for a request head or body is closed, so idle and slow clients cannot take the descriptors a ping needs. Accepts
  that fail all the same (descriptors used up elsewhere) are counted and logged at a bounded rate.
* A request's head must arrive within ``--header-timeout`` seconds (408, then closed) and its body within
  ``--request-timeout`` (408); an idle kept-alive connection is closed after ``--keep-alive`` seconds.
* Framing follows h11: conflicting ``Content-Length`` headers, a non-digit length, a malformed chunk size or an
  unknown ``Transfer-Encoding`` get 400 and a closed connection. A request with both ``Content-Length`` and
  ``Transfer-Encoding`` (the shape of request smuggling) gets 400 and its connection is closed unread.
* The headers alone decide 413 (``Content-Length`` over ``--max-body-mb``, default 6 MiB like SageMaker's
  real-time limit), 415 and 404 before any byte of the body is read (``Expect: 100-continue`` gets that final
  answer instead of ``100 Continue``); those connections are closed. A chunked body is counted as it streams in
  and refused 413 at the limit.
* Every answer but 200 is JSON ``{"error": reason, "status": code}``: 400 for an empty or unreadable body
  (corrupt DICOM, truncated PNG, ...), 406 for an unsupported ``Accept``, 500 for a failure of the model, which is
  logged with its traceback; no request can stop the server.
* One log line per request: client, request line, status, bytes in and out, milliseconds from arrival to answer.
* ``GET /execution-parameters`` answers a Batch Transform job (:mod:`pneumoseg.serve.transform`); inside one
  (``SAGEMAKER_BATCH``) the body limit is the job's ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` and the queue takes its
  ``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS``. A JSON answer is one line, so ``AssembleWith: Line`` joins a job's
  answers into a JSON Lines file.
* SIGTERM (or Ctrl-C) stops accepting, lets the requests in flight finish (at most :data:`DRAIN_SECONDS`), exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from pneumoseg.errors import PneumosegError
from pneumoseg.inference.runtime import AUTO, RUNTIMES
from pneumoseg.logs import setup_logging
from pneumoseg.modeling.device import set_cpu_threads
from pneumoseg.serve.handler import (
    JSON,
    ImageInput,
    RequestError,
    Result,
    check_content_type,
    error_body,
    input_fn,
    negotiate,
    predict_fn,
    respond,
)
from pneumoseg.serve.package import ServingModel, load_package, open_package
from pneumoseg.serve.protocol import ConnectionBudget, GuardedH11Protocol, RateLimitedCount
from pneumoseg.serve.transform import (
    ASYNC_MAX_BODY_MB,
    EXECUTION_PARAMETERS,
    TransformJob,
    execution_parameters,
    transform_job,
)
from pneumoseg.stage_table import command

log = logging.getLogger(__name__)

PING = "/ping"
INVOCATIONS = "/invocations"
DRAIN_SECONDS = 25
"""Longest wait for the requests in flight after SIGTERM: SageMaker sends SIGKILL 30 s after it."""
FD_RESERVE = 256
"""File descriptors kept free of connections for everything else: the model's files and libraries (about 60 once
loaded), logging, and the connections accepted in a turn of the event loop before the longest-waiting ones are
closed (:data:`ACCEPTS_PER_TURN`)."""
LISTEN_BACKLOG = 2048
"""Connections the kernel queues for the server to accept."""
ACCEPTS_PER_TURN = 64
"""Connections accepted in one turn of the event loop, before the longest-waiting ones can be closed to make room
(asyncio accepts as many as the backlog it is given, which would take every reserved descriptor at once)."""


@dataclass(frozen=True)
class Limits:
    """How much the server takes in.

    Attributes:
        max_body_bytes: larger request bodies are answered 413 (SageMaker's real-time limit by default).
        max_queue: requests that may wait for a worker thread; more are answered 503.
        max_inference: ``/invocations`` requests open at once (sending their body, queued or running); more are
            answered 503. ``/ping`` is not counted.
        max_connections: open connections at most, None for as many as the file descriptors allow (less
            :data:`FD_RESERVE`); beyond, the connection that has waited longest for its client is closed.
    """

    max_body_bytes: int = 6 * 2**20
    max_queue: int = 32
    max_inference: int = 256
    max_connections: int | None = None


@dataclass(frozen=True)
class Timeouts:
    """Seconds a client is given.

    Attributes:
        header: to send a request's head, from the connection's opening or the request's first byte.
        body: to send a request's body once its head is in.
        keep_alive: an idle connection stays open between requests.
    """

    header: float = 5.0
    body: float = 30.0
    keep_alive: float = 60.0


@dataclass(frozen=True)
class ServerSettings:
    """How the server takes requests (see the module docstring).

    Attributes:
        host: address to listen on (``0.0.0.0`` for every interface, as in a container).
        port: TCP port; 0 picks a free one.
        workers: threads that predict and encode requests.
        predictions: requests predicting at once.
        decoders: threads that decode request bodies.
        decode_seconds: longest a request's decode may take; it is answered 400 after.
        limits: body size, queue and connection limits.
        timeouts: header, body and keep-alive timeouts.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 4
    predictions: int = 1
    decoders: int = 8
    decode_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass
class Reply:
    """An HTTP answer; ``close`` ends the connection after it (the request's body may be unread)."""

    status: int
    body: bytes
    content_type: str = JSON
    close: bool = False

    def response(self) -> Response:
        """The Starlette response of this reply."""
        headers = {"Connection": "close"} if self.close else None
        return Response(self.body, status_code=self.status, media_type=self.content_type, headers=headers)


def error_reply(status: int, message: str, close: bool = False) -> Reply:
    """A JSON error answer: ``{"error": message, "status": status}``."""
    return Reply(int(status), error_body(status, message), JSON, close)


class InferenceService:
    """The handler behind the HTTP layer: ``/ping`` and ``/invocations`` as replies; it never raises.

    Args:
        predictions: requests predicting at once.
        workers: threads that predict and encode for :meth:`submit` (and run :meth:`invoke`).
        max_queue: requests that may wait for one of them; :meth:`submit` answers 503 beyond.
        decoders: threads that decode for :meth:`submit`; while all are busy past their budget, it answers 503.
        decode_seconds: longest a decode may take in :meth:`submit`; the request is answered 400 after.

    Attributes:
        model: the loaded package; None until it is loaded (both endpoints answer 503 meanwhile).
    """

    def __init__(
        self,
        predictions: int = 1,
        workers: int = 1,
        max_queue: int = 0,
        decoders: int = 1,
        decode_seconds: float = 10.0,
    ) -> None:
        self.model: ServingModel | None = None
        self._slots = threading.BoundedSemaphore(predictions)
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pneumoseg-worker")
        self._decoders = decoders
        self._decode_pool = ThreadPoolExecutor(decoders, thread_name_prefix="pneumoseg-decoder")
        self.decode_seconds = decode_seconds
        self._capacity = workers + max_queue
        # Only touched on the event loop's thread: requests admitted, and the decodes still running past their
        # budget (each holds its decoder until its thread ends).
        self._admitted = 0
        self._overdue: set[asyncio.Future] = set()
        self._free_decoders: asyncio.Semaphore | None = None  # made on the event loop, at the first decode

    def ping(self) -> Reply:
        model = self.model
        if model is None:
            return error_reply(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading")
        return Reply(
            HTTPStatus.OK,
            json.dumps(
                {"status": "ready", "model": model.name, "version": model.version, "runtime": model.runtime}
            ).encode(),
        )

    async def submit(self, body: bytes, content_type: str | None, accept: str | None) -> Reply:
        """Decode ``body`` in a decoder thread (:meth:`decode`), then predict and encode it in a worker thread; 503
        at once when ``workers + max_queue`` requests are in."""
        if self._admitted >= self._capacity:
            return error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server already has {self._capacity} requests running or queued; retry shortly",
            )
        self._admitted += 1
        try:
            data = await self.decode(body, content_type, accept)
            if isinstance(data, Reply):
                return data
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._respond, data, accept)
        finally:
            self._admitted -= 1

    async def decode(self, body: bytes, content_type: str | None, accept: str | None) -> ImageInput | Reply:
        """The decoded request, or its error answer: 400 for a body that does not decode or whose decode takes
        longer than ``decode_seconds`` (its thread is left to finish, holding its decoder), 503 at once while every
        decoder is held so. A request waits for a free decoder otherwise."""
        if self.model is None:
            return error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; retry when GET /ping answers 200"
            )
        if len(self._overdue) >= self._decoders:
            return error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"all {self._decoders} decoders are busy with costly images; retry shortly",
            )
        if self._free_decoders is None:
            self._free_decoders = asyncio.Semaphore(self._decoders)
        await self._free_decoders.acquire()
        future = asyncio.get_running_loop().run_in_executor(self._decode_pool, _decode, body, content_type, accept)
        future.add_done_callback(self._decoded)  # the decoder is freed when its thread ends, not at the budget
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.decode_seconds)
        except TimeoutError:
            self._overdue.add(future)
            return error_reply(
                HTTPStatus.BAD_REQUEST,
                f"decoding the image took longer than the "
                f"{self.decode_seconds:g} s this server allows; send a "
                f"simpler encoding (baseline JPEG, PNG or uncompressed DICOM)",
            )

    def _decoded(self, future: asyncio.Future) -> None:
        self._overdue.discard(future)
        assert self._free_decoders is not None
        self._free_decoders.release()
        if not future.cancelled():
            future.exception()  # retrieved: an overdue decode's failure has nobody left to answer

    def _respond(self, data: ImageInput, accept: str | None) -> Reply:
        model = self.model
        assert model is not None  # decode answered 503 before the model was loaded
        return Reply(*respond(model, data, accept, predict=self._predict))

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> Reply:
        """Decode ``body``, predict and encode the answer as ``accept`` asks (the handler's :func:`answer`)."""
        model = self.model
        if model is None:
            return error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; retry when GET /ping answers 200"
            )
        data = _decode(body, content_type, accept)
        return data if isinstance(data, Reply) else Reply(*respond(model, data, accept, predict=self._predict))

    def _predict(self, data: ImageInput, model: ServingModel) -> Result:
        with self._slots:
            return predict_fn(data, model)

    def warm_up(self, model: ServingModel) -> None:
        """Predict a blank image once in each worker thread: PyTorch's first call in a thread sets up its own thread
        pool and caches, which made the first requests after a start take seconds."""
        blank = ImageInput(np.zeros((model.predictor.image_size,) * 2, np.uint8), None, "warm-up")
        barrier = threading.Barrier(self._workers)

        def once() -> None:
            barrier.wait()  # every worker thread busy at once: each one runs a warm-up
            self._predict(blank, model)

        for future in [self._pool.submit(once) for _ in range(self._workers)]:
            future.result()

    def close(self) -> None:
        """Wait for the threads' last requests and stop them."""
        self._pool.shutdown(wait=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)  # an overdue decode's answer is sent already


def _decode(body: bytes, content_type: str | None, accept: str | None) -> ImageInput | Reply:
    """The handler's :func:`input_fn` of ``body``, with an unacceptable ``Accept`` refused first; an error is its
    answer."""
    try:
        negotiate(accept)
        return input_fn(body, content_type)
    except RequestError as exc:
        return error_reply(exc.status, str(exc))


def head_rejection(request: Request, max_body_bytes: int) -> Reply | None:
    """The answer an ``/invocations`` request gets from its head alone (its body unread), or None to read it."""
    headers = request.headers
    if "content-length" in headers and "transfer-encoding" in headers:
        # RFC 9112 6.1: a server may process such a request but must close the connection after it; refusing it
        # leaves nothing for a smuggled second request to ride on.
        return error_reply(
            HTTPStatus.BAD_REQUEST,
            "the request has both Content-Length and Transfer-Encoding; send one of them",
            close=True,
        )
    length = int(headers.get("content-length", "0"))  # h11 has checked that it is digits
    if length > max_body_bytes:
        return error_reply(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the body has {length} bytes, more than the {max_body_bytes} this server accepts",
            close=True,
        )
    try:
        check_content_type(headers.get("content-type"))
    except RequestError as exc:
        return error_reply(exc.status, str(exc), close=True)
    return None


async def read_body(request: Request, limit: int, timeout: float) -> bytes | Reply:
    """The request's body, or the error answer when it is over ``limit`` bytes or slower than ``timeout`` s."""
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    return error_reply(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the body exceeds the {limit} bytes this server accepts",
                        close=True,
                    )
                parts.append(part)
    except TimeoutError:
        return error_reply(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {timeout:g} s", close=True)
    except ClientDisconnect:  # nobody is left to answer; the reply only makes the log line
        return error_reply(
            HTTPStatus.BAD_REQUEST, f"the client closed the connection after {size} bytes of the body", close=True
        )
    return b"".join(parts)


class AccessLog:
    """ASGI middleware: one log line per request (client, request line, status, bytes in and out, milliseconds).

    Args:
        app: the ASGI application whose requests are logged.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        seen = {"in": 0, "out": 0, "status": 0}

        async def counted_receive():
            message = await receive()
            seen["in"] += len(message.get("body", b""))
            return message

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            query = scope.get("query_string", b"")
            target = scope["raw_path"].decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
            client = scope["client"][0] if scope.get("client") else "-"
            log.info(
                '%s "%s %s HTTP/%s" %d %d B in, %d B out, %.1f ms',
                client,
                scope["method"],
                target,
                scope["http_version"],
                seen["status"],
                seen["in"],
                seen["out"],
                (time.perf_counter() - began) * 1000,
            )


def build_app(service: InferenceService, settings: ServerSettings) -> AccessLog:
    """The ASGI application: ``/ping`` and ``/invocations`` of ``service``, JSON errors, the access log."""

    async def ping(request: Request) -> Response:
        return service.ping().response()

    open_requests = 0  # /invocations requests between head and answer; only touched on the event loop's thread

    async def invocations(request: Request) -> Response:
        nonlocal open_requests
        limits = settings.limits
        if open_requests >= limits.max_inference:
            return error_reply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server already has {limits.max_inference} requests open; retry shortly",
                close=True,
            ).response()
        rejection = head_rejection(request, limits.max_body_bytes)
        if rejection is not None:
            return rejection.response()
        open_requests += 1
        try:
            body = await read_body(request, limits.max_body_bytes, settings.timeouts.body)
            if isinstance(body, Reply):
                return body.response()
            reply = await service.submit(body, request.headers.get("content-type"), request.headers.get("accept"))
        finally:
            open_requests -= 1
        return reply.response()

    async def parameters(request: Request) -> Response:
        answer = execution_parameters(settings.workers, settings.limits.max_body_bytes)
        return Reply(HTTPStatus.OK, json.dumps(answer).encode()).response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
        else:
            message = f"no endpoint {request.method} {request.url.path}; use GET {PING} or POST {INVOCATIONS}"
        # An unread body of a refused request must not be taken for the next request: close.
        reply = error_reply(exc.status_code, message, close=True)
        response = reply.response()
        response.headers.update(exc.headers or {})
        return response

    handlers: dict[Any, Any] = {HTTPException: http_error}  # starlette types a handler as taking any Exception
    app = Starlette(
        routes=[
            Route(PING, ping, methods=["GET"]),
            Route(INVOCATIONS, invocations, methods=["POST"]),
            Route(EXECUTION_PARAMETERS, parameters, methods=["GET"]),
        ],
        exception_handlers=handlers,
    )
    return AccessLog(app)


def uvicorn_server(app, settings: ServerSettings, budget: ConnectionBudget) -> uvicorn.Server:
    """The uvicorn server of ``app`` with ``settings``' timeouts, its connections in ``budget``; it logs through
    this package's log. uvicorn's own connection cap stays off: it would count the health check and idle
    connections too (the app caps ``/invocations`` itself)."""
    # uvicorn takes a protocol factory and a float keep-alive, though its annotations ask for a class and an int.
    protocol: Any = functools.partial(GuardedH11Protocol, header_timeout=settings.timeouts.header, budget=budget)
    keep_alive: Any = settings.timeouts.keep_alive
    config = uvicorn.Config(
        app,
        http=protocol,
        loop="asyncio",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=keep_alive,
        backlog=ACCEPTS_PER_TURN,
        timeout_graceful_shutdown=DRAIN_SECONDS,
    )
    return uvicorn.Server(config)


def connection_limit(requested: int | None) -> int:
    """The open connections the server allows: ``requested``, or as many as the file descriptors allow.

    Raises the process's soft limit of file descriptors to its hard limit first (a container's default soft limit,
    1024, would otherwise cap a busy server), then keeps :data:`FD_RESERVE` of them, and those open now, free.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    available = max(16, soft - in_use - FD_RESERVE)
    if requested is not None and requested > available:
        log.warning(
            "--max-connections %d exceeds the %d connections the file descriptor limit (%d) allows; using %d",
            requested,
            available,
            soft,
            available,
        )
    return available if requested is None else min(requested, available)


def accept_failure_handler(budget: ConnectionBudget):
    """An event loop exception handler that counts failed accepts (out of descriptors or memory) and logs them at a
    bounded rate instead of a traceback each, closing the longest-waiting connections to free descriptors; every
    other exception goes to the loop's default handler."""
    failures = RateLimitedCount("connections could not be accepted", "raise the file descriptor limit (ulimit -n)")
    resources = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in resources and "accept" in context.get("message", ""):
            budget.shed_oldest(max(1, FD_RESERVE // 8))
            failures.add(1, os.strerror(exc.errno))
            return
        loop.default_exception_handler(context)

    return handle


async def serve(server: uvicorn.Server, listener: socket.socket, budget: ConnectionBudget) -> None:
    """Run ``server`` on ``listener`` with :func:`accept_failure_handler` on its event loop, accepting at most
    :data:`ACCEPTS_PER_TURN` connections a turn while the kernel queues :data:`LISTEN_BACKLOG`."""
    asyncio.get_running_loop().set_exception_handler(accept_failure_handler(budget))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        listener.listen(LISTEN_BACKLOG)  # asyncio listened with uvicorn's backlog, the accepts per turn
    await serving


def parser() -> argparse.ArgumentParser:
    defaults, limits, timeouts = ServerSettings(), Limits(), Timeouts()
    result = argparse.ArgumentParser(
        prog="python -m pneumoseg.serve",
        description="Serve a pneumoseg model package "
        "over HTTP: GET /ping, POST /invocations (SageMaker's container contract).",
    )
    result.add_argument("--model", required=True, help=f"model.tar.gz of {command('06')}, or the folder it extracts to")
    result.add_argument(
        "--host", default=defaults.host, help="address to listen on (default %(default)s; 0.0.0.0 in a container)"
    )
    result.add_argument(
        "--port", type=int, default=defaults.port, help="TCP port, 0 for any free one (default %(default)s)"
    )
    result.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the models run (default: a GPU when there is one)",
    )
    result.add_argument(
        "--runtime",
        default=AUTO,
        choices=RUNTIMES,
        help="what computes the forward passes (default: ONNX Runtime on the CPU when the package "
        "holds ONNX models, else torch)",
    )
    result.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="threads predicting and encoding requests (default %(default)s)",
    )
    result.add_argument(
        "--decoders",
        type=int,
        default=defaults.decoders,
        help="threads decoding request bodies; while all are busy, requests get 503 (default %(default)s)",
    )
    result.add_argument(
        "--decode-seconds",
        type=float,
        default=defaults.decode_seconds,
        help="longest a request's decode may take; 400 after (default %(default)g)",
    )
    result.add_argument(
        "--predictions",
        type=int,
        default=defaults.predictions,
        help="requests predicting at once (default %(default)s)",
    )
    result.add_argument(
        "--torch-threads",
        default="auto",
        help="torch threads of each prediction: auto = the cores this process may use shared among "
        "--predictions (at least 1), or a number (default %(default)s)",
    )
    result.add_argument(
        "--max-queue",
        type=int,
        default=limits.max_queue,
        help="requests waiting for a worker at most; more get 503 (default %(default)s)",
    )
    result.add_argument(
        "--max-body-mb",
        type=float,
        default=limits.max_body_bytes / 2**20,
        help="largest request body in MiB; larger ones get 413 (default %(default)g)",
    )
    result.add_argument(
        "--max-inference",
        type=int,
        default=limits.max_inference,
        help="/invocations requests open at once (sending, queued or running); more get 503 (default %(default)s)",
    )
    result.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        help="open connections at most; beyond, the one waiting longest for its client is closed "
        "(default: as many as the file descriptor limit allows)",
    )
    result.add_argument(
        "--header-timeout",
        type=float,
        default=timeouts.header,
        help="seconds a client has to send a request's head; 408 after (default %(default)g)",
    )
    result.add_argument(
        "--request-timeout",
        type=float,
        default=timeouts.body,
        help="seconds a client has to send a request's body; 408 after (default %(default)g)",
    )
    result.add_argument(
        "--keep-alive",
        type=float,
        default=timeouts.keep_alive,
        help="seconds an idle connection stays open (default %(default)g)",
    )
    return result


def settings_from(args: argparse.Namespace) -> ServerSettings:
    """The :class:`ServerSettings` of parsed command-line arguments."""
    return ServerSettings(
        host=args.host,
        port=args.port,
        workers=args.workers,
        predictions=args.predictions,
        decoders=args.decoders,
        decode_seconds=args.decode_seconds,
        limits=Limits(
            max_body_bytes=int(args.max_body_mb * 2**20),
            max_queue=args.max_queue,
            max_inference=args.max_inference,
            max_connections=args.max_connections,
        ),
        timeouts=Timeouts(header=args.header_timeout, body=args.request_timeout, keep_alive=args.keep_alive),
    )


def within_transform(settings: ServerSettings, job: TransformJob | None) -> ServerSettings:
    """``settings`` as a Batch Transform job needs them (None: unchanged): its payload limit as the body limit, and
    a queue deep enough that the requests it sends at once are never answered 503.

    Args:
        settings: the settings of the command line.
        job: the transform job of the environment (:func:`pneumoseg.serve.transform.transform_job`).
    """
    if job is None:
        return settings
    limits = replace(
        settings.limits,
        max_body_bytes=job.max_payload_mb * 2**20,
        max_queue=max(settings.limits.max_queue, job.max_concurrent - settings.workers),
    )
    return replace(settings, limits=limits)


def load_in_background(
    service: InferenceService, server: uvicorn.Server, model: str, device: str, runtime: str = AUTO
) -> threading.Event:
    """Load ``model`` into ``service`` in a thread (``/ping`` answers 503 meanwhile); on failure, log why and stop
    ``server``. Returns the event set on failure."""
    failed = threading.Event()

    def load() -> None:
        try:
            with open_package(model) as model_dir:
                loaded = load_package(model_dir, device, runtime)
            service.warm_up(loaded)
        except Exception as exc:  # any failure to load ends the server: it has nothing to serve
            # A PneumosegError says what to fix; anything else is a bug and keeps its traceback.
            log.error("cannot load the model: %s", exc, exc_info=not isinstance(exc, PneumosegError))
            failed.set()
            server.should_exit = True
            return
        service.model = loaded
        predictor = loaded.predictor
        log.info(
            "model %s version %s ready: %d models, %d forward passes per image at %s px on %s (%s), post-processing %s",
            loaded.name,
            loaded.version,
            len(predictor.models),
            predictor.n_views,
            "/".join(map(str, predictor.image_sizes)),
            predictor.device,
            loaded.runtime,
            loaded.postprocess,
        )

    threading.Thread(target=load, name="pneumoseg-load", daemon=True).start()
    return failed


def main(argv: list[str] | None = None) -> int:
    """Listen, load the model in the background, serve until SIGTERM or Ctrl-C. Returns 0 after a clean stop, 1
    when the model cannot be loaded or the port cannot be listened on."""
    arguments = parser()
    args = arguments.parse_args(argv)
    for name in ("workers", "predictions", "decoders", "max_inference", "max_connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            arguments.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        arguments.error("--max-queue must be at least 0")
    if not args.decode_seconds > 0:
        arguments.error("--decode-seconds must be more than 0")
    if not 0 < args.max_body_mb <= ASYNC_MAX_BODY_MB:
        arguments.error(
            f"--max-body-mb must be above 0 and at most {ASYNC_MAX_BODY_MB} (asynchronous inference's 1 GB)"
        )
    setup_logging()
    try:
        threads = set_cpu_threads(args.torch_threads, "--torch-threads", sharers=args.predictions)
    except PneumosegError as exc:
        arguments.error(str(exc))
    log.info("%d torch threads for each of %d predictions at once", threads, args.predictions)
    try:
        job = transform_job(default_payload_mb=max(1, int(args.max_body_mb)), default_concurrent=args.workers)
    except PneumosegError as exc:
        log.error("%s", exc)
        return 1
    settings = within_transform(settings_from(args), job)
    if job is not None:
        log.info("in a Batch Transform job: records up to %d MB, %d at once", job.max_payload_mb, job.max_concurrent)
    service = InferenceService(
        settings.predictions, settings.workers, settings.limits.max_queue, settings.decoders, settings.decode_seconds
    )
    budget = ConnectionBudget(connection_limit(settings.limits.max_connections))
    server = uvicorn_server(build_app(service, settings), settings, budget)
    try:
        listener = socket.create_server((settings.host, settings.port), backlog=LISTEN_BACKLOG)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    host, port = listener.getsockname()[:2]
    log.info(
        "listening on http://%s:%d (GET %s, POST %s; at most %d connections); loading %s",
        host,
        port,
        PING,
        INVOCATIONS,
        budget.limit,
        args.model,
    )
    failed = load_in_background(service, server, args.model, args.device, args.runtime)
    # uvicorn re-raises the signal that stopped it once it is done: this handler makes that a no-op.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    asyncio.run(serve(server, listener, budget))
    service.close()
    log.info("stopped")
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
