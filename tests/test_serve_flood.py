"""The health check under floods: idle connections past the file descriptor limit, hundreds of slow clients that
keep re-opening (slow heads and slow bodies), accepts failing for want of descriptors, and clients that leave
before their 408. Every client talks to 127.0.0.1 only, in bounded numbers and for bounded seconds."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import socket
import threading
import time
from types import SimpleNamespace

import h11
import numpy as np
import pytest
from PIL import Image

from fake_experiment import make_package
from pneumoseg.serve import handler as serving
from pneumoseg.serve import package as package_format
from pneumoseg.serve import protocol
from pneumoseg.serve import server as serving_server
from pneumoseg.serve.protocol import ConnectionBudget, RateLimitedCount
from pneumoseg.serve.server import InferenceService, accept_failure_handler
from serve_client import HOST, SlowFlood, call, running_server

MAX_FILES = 512  # the server's file descriptor limit in these tests: far fewer than the connections opened
# Seconds for 9 pings in 10: loose, for a busy 2-core test machine; the target (p99 under 100 ms) is measured by
# benchmarks/bench_serve.py. What the old server failed was the status: 503 for every ping under these floods.
PING_BOUND = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("flood")
    _, package = make_package(root)
    with running_server(
        package,
        root / "server.log",
        "--header-timeout",
        "2",
        "--request-timeout",
        "3",
        "--workers",
        "2",
        "--max-inference",
        "32",
        max_files=MAX_FILES,
    ) as started:
        yield started


def _pings(port: int, count: int, pause: float = 0.05) -> list[tuple[int, float]]:
    """``count`` pings, each on a new connection: ``(status, seconds)`` each."""
    results = []
    for _ in range(count):
        began = time.perf_counter()
        try:
            status = call(port, "GET", "/ping", timeout=10)[0]
        except OSError:
            status = 0
        results.append((status, time.perf_counter() - began))
        time.sleep(pause)
    return results


def _check_pings(results: list[tuple[int, float]]) -> None:
    statuses = [status for status, _ in results]
    seconds = sorted(elapsed for _, elapsed in results)
    assert statuses == [200] * len(results), f"ping statuses {sorted(set(statuses))}: {statuses}"
    assert seconds[int(0.9 * (len(seconds) - 1))] < PING_BOUND, f"slowest pings {seconds[-10:]}"


@pytest.mark.slow
def test_ping_answers_while_idle_connections_exceed_the_descriptors(server):
    """1,500 kept-alive idle connections (each sent one ping, its answer left unread) against a server allowed 512
    descriptors: the longest-idle ones are closed to make room, every ping gets 200, and the log says so in a
    few lines, without a traceback."""
    idle = []
    try:
        for _ in range(1500):
            idle.append(socket.create_connection((HOST, server.port), timeout=10))
            idle[-1].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        _check_pings(_pings(server.port, 40))
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    log = server.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert "idle or slow connections closed" in log
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) < 20, warnings[:20]


@pytest.mark.slow
def test_ping_answers_while_300_slow_clients_keep_reopening(server):
    """150 slow heads and 150 slow bodies, re-opening as they are cut off (408), for 8 seconds: every ping 200."""
    flood = SlowFlood(server.port, 300)
    flood.start()
    try:
        time.sleep(2.5)  # past the header timeout: the first clients have been cut off and come back
        results = _pings(server.port, 50)
    finally:
        flood.stop.set()
        flood.join(30)
    _check_pings(results)
    assert flood.reopened >= 150  # the slow heads were cut off and re-opened at least once
    log = server.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log


def test_the_inference_cap_still_applies(server):
    """The cap counts /invocations requests only: 32 slow bodies fill it, the next request gets 503, ping 200."""
    for _ in range(3):  # the slow bodies hold their places only within the 3 s request timeout; retry a slow start
        held = []
        try:
            began = time.perf_counter()
            for _ in range(32):
                sock = socket.create_connection((HOST, server.port), timeout=10)
                sock.sendall(
                    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\nxx"
                )
                held.append(sock)
            time.sleep(0.5)
            status, _, body = call(server.port, "POST", "/invocations", b"x" * 10, {"Content-Type": "image/png"})
            if time.perf_counter() - began > 2.5:  # the first bodies may have timed out meanwhile: not a test
                continue
            assert status == 503 and b"requests open" in body
            assert call(server.port, "GET", "/ping")[0] == 200
            return
        finally:
            for sock in held:
                sock.close()
    pytest.fail("opening 32 connections took longer than the server's request timeout three times")


# ---------------------------------------------------------------------------------------------------------
# Decode bombs: the service in this process, its decoder made slow for the bodies b"bomb"


@pytest.fixture(scope="module")
def model(server):
    with package_format.open_package(server.package) as model_dir:
        return package_format.load_package(model_dir, device="cpu")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_slow_decodes_hold_neither_the_workers_nor_every_decoder(model, monkeypatch):
    """Four bombs in flight: a valid request is answered at once, each bomb gets 400 at the decode budget; while
    their threads still run, the remaining decoders serve; once all are held past the budget, 503 at once; freed,
    200 again."""
    release, real_input_fn = threading.Event(), serving.input_fn

    def slow_input_fn(body: bytes, content_type: str | None):
        if body == b"bomb":
            release.wait(30)
        return real_input_fn(body, content_type)

    monkeypatch.setattr(serving_server, "input_fn", slow_input_fn)
    service = InferenceService(predictions=1, workers=2, max_queue=8, decoders=6, decode_seconds=1.5)
    service.model = model
    png = _png()

    async def scenario() -> dict:
        bombs = [asyncio.create_task(service.submit(b"bomb", "image/png", None)) for _ in range(4)]
        await asyncio.sleep(0.2)
        began = time.perf_counter()
        valid = await service.submit(png, "image/png", None)
        seconds = time.perf_counter() - began
        refused = await asyncio.gather(*bombs)
        more = [asyncio.create_task(service.submit(b"bomb", "image/png", None)) for _ in range(2)]
        await asyncio.gather(*more)  # answered 400 at the budget: all six decoders are now overdue
        began = time.perf_counter()
        busy = await service.submit(png, "image/png", None)
        busy_seconds = time.perf_counter() - began
        release.set()
        await asyncio.sleep(0.2)
        return {
            "valid": valid,
            "seconds": seconds,
            "refused": refused,
            "busy": busy,
            "busy_seconds": busy_seconds,
            "after": await service.submit(png, "image/png", None),
        }

    try:
        outcome = asyncio.run(scenario())
    finally:
        release.set()
        service.close()
    assert outcome["valid"].status == 200 and outcome["seconds"] < 1.0, outcome["seconds"]
    assert [reply.status for reply in outcome["refused"]] == [400] * 4
    assert b"longer than the 1.5 s" in outcome["refused"][0].body
    assert outcome["busy"].status == 503 and b"decoders are busy" in outcome["busy"].body
    assert outcome["busy_seconds"] < 0.5
    assert outcome["after"].status == 200


# ---------------------------------------------------------------------------------------------------------
# The parts, without a server


class _Connection:
    """A stand-in for a :class:`GuardedH11Protocol`: waiting for its client, or busy answering."""

    def __init__(self, waiting: bool) -> None:
        self._waiting = waiting
        self.transport = SimpleNamespace(aborted=False)
        self.transport.abort = lambda: setattr(self.transport, "aborted", True)

    def waiting(self) -> bool:
        return self._waiting


def test_budget_closes_the_least_recently_active_waiting_connections():
    budget = ConnectionBudget(3)
    busy, old, newer, touched, new = (_Connection(waiting) for waiting in (False, True, True, True, True))
    for connection in (busy, old, touched, newer):
        budget.opened(connection)
    budget.active(touched)  # its request head just arrived: now the most recently active
    budget.opened(new)  # five open, limit three: two must go
    assert busy.transport.aborted is False  # a request being answered is never closed
    assert old.transport.aborted and newer.transport.aborted
    assert not touched.transport.aborted and not new.transport.aborted
    assert len(budget) == 3 and budget.shed.total == 2


def test_failed_accepts_are_counted_and_logged_at_a_bounded_rate(caplog):
    budget = ConnectionBudget(10)
    handler = accept_failure_handler(budget)
    context = {"message": "socket.accept() out of system resource", "exception": OSError(errno.EMFILE, "Too many")}
    loop = SimpleNamespace(default_exception_handler=lambda context: pytest.fail(f"default handler: {context}"))
    with caplog.at_level(logging.WARNING, logger="pneumoseg.serve.server"):
        for _ in range(10_000):
            handler(loop, context)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "could not be accepted" in lines[0] and not caplog.records[0].exc_info


def test_rate_limited_count_logs_the_events_held_back(caplog, monkeypatch):
    count = RateLimitedCount("things", "do less")
    clock = iter(np.arange(0.0, 100.0, 1.0))
    monkeypatch.setattr(protocol.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger="pneumoseg.serve.server"):
        for _ in range(25):
            count.add()
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == ["1 things", "10 things", "10 things"]
    assert count.total == 25


def test_lingering_close_of_a_client_that_left_raises_nothing():
    """The 408 of a client already gone: shutting its socket's writing side fails (ENOTCONN); the connection is
    closed quietly instead of an "Exception in ASGI application"."""
    closed = []

    def write_eof() -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    transport = SimpleNamespace(
        is_closing=lambda: False, can_write_eof=lambda: True, write_eof=write_eof, close=lambda: closed.append(True)
    )
    connection = SimpleNamespace(conn=SimpleNamespace(their_state=h11.SEND_BODY), discard_input=False)
    protocol._LingeringClose(transport, connection).close()  # type: ignore[arg-type]
    assert closed == [True] and connection.discard_input is False


def test_requests_wait_for_a_decoder_rather_than_being_refused(model):
    """More valid requests at once than decoders: all are answered 200 (they queue for a decoder; 503 is only for
    decoders held past their budget)."""
    service = InferenceService(predictions=1, workers=2, max_queue=16, decoders=2, decode_seconds=30)
    service.model = model
    png = _png()

    async def burst() -> list:
        return await asyncio.gather(*(service.submit(png, "image/png", None) for _ in range(12)))

    try:
        replies = asyncio.run(burst())
    finally:
        service.close()
    assert [reply.status for reply in replies] == [200] * 12
