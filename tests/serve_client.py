"""Starting ``python -m pneumoseg.serve`` on a free loopback port and talking to it, for the server's tests."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_SECONDS = 180  # importing torch and loading the models, on a busy 2-core machine


@dataclass
class Server:
    port: int
    log: Path
    process: subprocess.Popen
    package: Path


@contextlib.contextmanager
def running_server(package: Path, log: Path, *options: str, max_files: int | None = None) -> Iterator[Server]:
    """The server of ``package`` with command-line ``options``, once ``/ping`` answers 200; killed at the end.
    ``max_files`` sets its file descriptor limit (soft and hard)."""
    command = [sys.executable, "-m", "pneumoseg.serve", "--model", str(package), "--port", "0", *options]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=limit_files)
    try:
        port = _wait_for_port(process, log)
        _wait_until_ready(process, port, log)
        yield Server(port, log, process, package)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _wait_for_port(process: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return int(match.group(1))
        assert process.poll() is None, f"the server exited early:\n{log.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"the server did not listen within {STARTUP_SECONDS} s:\n{log.read_text()}")


def _wait_until_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        status, _, _ = call(port, "GET", "/ping")
        if status == 200:
            return
        assert status == 503 and process.poll() is None, f"unexpected ping {status}:\n{log.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"the model did not load within {STARTUP_SECONDS} s:\n{log.read_text()}")


def call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a new connection: ``(status, headers, body)``; the headers are case-insensitive."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` on a raw socket and read until the server closes or ``timeout``."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_head(sock: socket.socket) -> bytes:
    """Read one response head (up to the blank line)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


class SlowFlood(threading.Thread):
    """``count`` slow clients on one thread, re-opening whenever the server cuts one off: half send a request head,
    half a body, one byte per ``interval`` seconds each; runs until :attr:`stop` is set."""

    HEAD = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\nX-Padding: " + b"y" * 500
    BODY = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 4000\r\n\r\n"
        + b"z" * 4000
    )

    def __init__(self, port: int, count: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.interval = port, count, interval
        self.stop = threading.Event()
        self.reopened = 0

    def _open(self, index: int) -> list:
        sock = socket.create_connection((HOST, self.port), timeout=5)
        sock.setblocking(False)
        script = self.HEAD if index % 2 else self.BODY
        # A body client sends its head at once, then dribbles the body.
        sent = script.index(b"\r\n\r\n") + 4 if script is self.BODY else 0
        if sent:
            sock.sendall(script[:sent])
        return [sock, script, sent]

    def run(self) -> None:
        clients = [self._open(index) for index in range(self.count)]
        while not self.stop.wait(self.interval):
            for index, client in enumerate(clients):
                sock, script, sent = client
                try:
                    if sock.recv(65536, socket.MSG_PEEK) is not None:  # an answer or a close: cut off
                        raise ConnectionError
                except BlockingIOError:
                    try:
                        sock.send(script[sent : sent + 1])
                        client[2] = sent + 1 if sent + 1 < len(script) else sent
                        continue
                    except OSError:
                        pass
                except OSError:
                    pass
                sock.close()
                self.reopened += 1
                try:
                    clients[index] = self._open(index)
                except OSError:
                    clients[index] = [socket.socket(), b"", 0]
        for sock, _, _ in clients:
            sock.close()
