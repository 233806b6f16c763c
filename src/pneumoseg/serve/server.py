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

* The loop parses every request and answers ``/ping`` itself; decoding, predicting and encoding run in
  ``--workers`` threads (``--predictions`` of them predicting at once; PyTorch releases the GIL), so a slow
  prediction never delays a ping. Past ``--max-queue`` requests waiting for a thread, more are answered 503 at
  once, as are requests past ``--max-connections`` open connections (uvicorn's own plain-text 503).
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
* SIGTERM (or Ctrl-C) stops accepting, lets the requests in flight finish (at most :data:`DRAIN_SECONDS`), exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from pneumoseg.logs import setup_logging
from pneumoseg.errors import PneumosegError
from pneumoseg.serve.handler import (JSON, ImageInput, RequestError, Result, answer, check_content_type,
                                     error_body, predict_fn)
from pneumoseg.inference.runtime import AUTO, RUNTIMES
from pneumoseg.serve.package import ServingModel, load_package, open_package
from pneumoseg.serve.protocol import GuardedH11Protocol
from pneumoseg.stage_table import command

log = logging.getLogger(__name__)

PING = "/ping"
INVOCATIONS = "/invocations"
DRAIN_SECONDS = 25
"""Longest wait for the requests in flight after SIGTERM: SageMaker sends SIGKILL 30 s after it."""


@dataclass(frozen=True)
class Limits:
    """How much the server takes in.

    Attributes:
        max_body_bytes: larger request bodies are answered 413 (SageMaker's real-time limit by default).
        max_queue: requests that may wait for a worker thread; more are answered 503.
        max_connections: open connections at most; requests beyond get 503.
    """

    max_body_bytes: int = 6 * 2 ** 20
    max_queue: int = 32
    max_connections: int = 256


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
        workers: threads that decode, predict and encode requests.
        predictions: requests predicting at once.
        limits: body size, queue and connection limits.
        timeouts: header, body and keep-alive timeouts.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 4
    predictions: int = 1
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
        workers: threads that run :meth:`invoke` for :meth:`submit`.
        max_queue: requests that may wait for one of them; :meth:`submit` answers 503 beyond.

    Attributes:
        model: the loaded package; None until it is loaded (both endpoints answer 503 meanwhile).
    """

    def __init__(self, predictions: int = 1, workers: int = 1, max_queue: int = 0) -> None:
        self.model: ServingModel | None = None
        self._slots = threading.BoundedSemaphore(predictions)
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pneumoseg-worker")
        self._capacity = workers + max_queue
        self._admitted = 0  # only touched on the event loop's thread

    def ping(self) -> Reply:
        model = self.model
        if model is None:
            return error_reply(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading")
        return Reply(HTTPStatus.OK, json.dumps({"status": "ready", "model": model.name,
                                                "version": model.version, "runtime": model.runtime}).encode())

    async def submit(self, body: bytes, content_type: str | None, accept: str | None) -> Reply:
        """:meth:`invoke` in a worker thread, or 503 at once when ``workers + max_queue`` requests are in."""
        if self._admitted >= self._capacity:
            return error_reply(HTTPStatus.SERVICE_UNAVAILABLE, f"the server already has {self._capacity} requests "
                                                               f"running or queued; retry shortly")
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.invoke, body, content_type,
                                                                    accept)
        finally:
            self._admitted -= 1

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> Reply:
        """Decode ``body``, predict and encode the answer as ``accept`` asks (the handler's :func:`answer`)."""
        model = self.model
        if model is None:
            return error_reply(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; retry when GET /ping "
                                                               "answers 200")
        return Reply(*answer(model, body, content_type, accept, predict=self._predict))

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


def head_rejection(request: Request, max_body_bytes: int) -> Reply | None:
    """The answer an ``/invocations`` request gets from its head alone (its body unread), or None to read it."""
    headers = request.headers
    if "content-length" in headers and "transfer-encoding" in headers:
        # RFC 9112 6.1: a server may process such a request but must close the connection after it; refusing it
        # leaves nothing for a smuggled second request to ride on.
        return error_reply(HTTPStatus.BAD_REQUEST, "the request has both Content-Length and Transfer-Encoding; "
                                                   "send one of them", close=True)
    length = int(headers.get("content-length", "0"))  # h11 has checked that it is digits
    if length > max_body_bytes:
        return error_reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {length} bytes, more than the "
                                                                f"{max_body_bytes} this server accepts", close=True)
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
                    return error_reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body exceeds the {limit} bytes "
                                                                            f"this server accepts", close=True)
                parts.append(part)
    except TimeoutError:
        return error_reply(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {timeout:g} s", close=True)
    except ClientDisconnect:  # nobody is left to answer; the reply only makes the log line
        return error_reply(HTTPStatus.BAD_REQUEST, f"the client closed the connection after {size} bytes of the "
                                                   f"body", close=True)
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
            log.info('%s "%s %s HTTP/%s" %d %d B in, %d B out, %.1f ms', client, scope["method"], target,
                     scope["http_version"], seen["status"], seen["in"], seen["out"],
                     (time.perf_counter() - began) * 1000)


def build_app(service: InferenceService, settings: ServerSettings) -> AccessLog:
    """The ASGI application: ``/ping`` and ``/invocations`` of ``service``, JSON errors, the access log."""

    async def ping(request: Request) -> Response:
        return service.ping().response()

    async def invocations(request: Request) -> Response:
        limits = settings.limits
        rejection = head_rejection(request, limits.max_body_bytes)
        if rejection is not None:
            return rejection.response()
        body = await read_body(request, limits.max_body_bytes, settings.timeouts.body)
        if isinstance(body, Reply):
            return body.response()
        reply = await service.submit(body, request.headers.get("content-type"), request.headers.get("accept"))
        return reply.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
        else:
            message = (f"no endpoint {request.method} {request.url.path}; use GET {PING} or POST {INVOCATIONS}")
        # An unread body of a refused request must not be taken for the next request: close.
        reply = error_reply(exc.status_code, message, close=True)
        response = reply.response()
        response.headers.update(exc.headers or {})
        return response

    handlers: dict[Any, Any] = {HTTPException: http_error}     # starlette types a handler as taking any Exception
    app = Starlette(routes=[Route(PING, ping, methods=["GET"]), Route(INVOCATIONS, invocations, methods=["POST"])],
                    exception_handlers=handlers)
    return AccessLog(app)


def uvicorn_server(app, settings: ServerSettings) -> uvicorn.Server:
    """The uvicorn server of ``app`` with ``settings``' limits and timeouts; it logs through this package's log."""
    # uvicorn takes a protocol factory and a float keep-alive, though its annotations ask for a class and an int.
    protocol: Any = functools.partial(GuardedH11Protocol, header_timeout=settings.timeouts.header)
    keep_alive: Any = settings.timeouts.keep_alive
    config = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, access_log=False, server_header=False,
                            timeout_keep_alive=keep_alive,
                            limit_concurrency=settings.limits.max_connections,
                            timeout_graceful_shutdown=DRAIN_SECONDS)
    return uvicorn.Server(config)


def parser() -> argparse.ArgumentParser:
    defaults, limits, timeouts = ServerSettings(), Limits(), Timeouts()
    result = argparse.ArgumentParser(prog="python -m pneumoseg.serve", description="Serve a pneumoseg model package "
                                     "over HTTP: GET /ping, POST /invocations (SageMaker's container contract).")
    result.add_argument("--model", required=True, help=f"model.tar.gz of {command('06')}, or the folder "
                                                       "it extracts to")
    result.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s; 0.0.0.0 in "
                                                              "a container)")
    result.add_argument("--port", type=int, default=defaults.port, help="TCP port, 0 for any free one (default "
                                                                        "%(default)s)")
    result.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the models run (default: a GPU when there is one)")
    result.add_argument("--runtime", default=AUTO, choices=RUNTIMES,
                        help="what computes the forward passes (default: ONNX Runtime on the CPU when the package "
                             "holds ONNX models, else torch)")
    result.add_argument("--workers", type=int, default=defaults.workers,
                        help="threads decoding, predicting and encoding requests (default %(default)s)")
    result.add_argument("--predictions", type=int, default=defaults.predictions,
                        help="requests predicting at once (default %(default)s)")
    result.add_argument("--max-queue", type=int, default=limits.max_queue,
                        help="requests waiting for a worker at most; more get 503 (default %(default)s)")
    result.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / 2 ** 20,
                        help="largest request body in MiB; larger ones get 413 (default %(default)g)")
    result.add_argument("--max-connections", type=int, default=limits.max_connections,
                        help="open connections at most; requests beyond get 503 (default %(default)s)")
    result.add_argument("--header-timeout", type=float, default=timeouts.header,
                        help="seconds a client has to send a request's head; 408 after (default %(default)g)")
    result.add_argument("--request-timeout", type=float, default=timeouts.body,
                        help="seconds a client has to send a request's body; 408 after (default %(default)g)")
    result.add_argument("--keep-alive", type=float, default=timeouts.keep_alive,
                        help="seconds an idle connection stays open (default %(default)g)")
    return result


def settings_from(args: argparse.Namespace) -> ServerSettings:
    """The :class:`ServerSettings` of parsed command-line arguments."""
    return ServerSettings(host=args.host, port=args.port, workers=args.workers, predictions=args.predictions,
                          limits=Limits(max_body_bytes=int(args.max_body_mb * 2 ** 20), max_queue=args.max_queue,
                                        max_connections=args.max_connections),
                          timeouts=Timeouts(header=args.header_timeout, body=args.request_timeout,
                                            keep_alive=args.keep_alive))


def load_in_background(service: InferenceService, server: uvicorn.Server, model: str, device: str,
                       runtime: str = AUTO) -> threading.Event:
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
        log.info("model %s version %s ready: %d models, %d forward passes per image at %s px on %s (%s), "
                 "post-processing %s", loaded.name, loaded.version, len(predictor.models), predictor.n_views,
                 "/".join(map(str, predictor.image_sizes)), predictor.device, loaded.runtime, loaded.postprocess)

    threading.Thread(target=load, name="pneumoseg-load", daemon=True).start()
    return failed


def main(argv: list[str] | None = None) -> int:
    """Listen, load the model in the background, serve until SIGTERM or Ctrl-C. Returns 0 after a clean stop, 1
    when the model cannot be loaded or the port cannot be listened on."""
    arguments = parser()
    args = arguments.parse_args(argv)
    for name in ("workers", "predictions", "max_connections"):
        if getattr(args, name) < 1:
            arguments.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        arguments.error("--max-queue must be at least 0")
    setup_logging()
    settings = settings_from(args)
    service = InferenceService(settings.predictions, settings.workers, settings.limits.max_queue)
    server = uvicorn_server(build_app(service, settings), settings)
    try:
        listener = socket.create_server((settings.host, settings.port), backlog=2048)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    host, port = listener.getsockname()[:2]
    log.info("listening on http://%s:%d (GET %s, POST %s); loading %s", host, port, PING, INVOCATIONS, args.model)
    failed = load_in_background(service, server, args.model, args.device, args.runtime)
    # uvicorn re-raises the signal that stopped it once it is done: this handler makes that a no-op.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    server.run(sockets=[listener])
    service.close()
    log.info("stopped")
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
