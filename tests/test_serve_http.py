"""The HTTP server (``python -m pneumoseg.serve``) started for real on a loopback port and called over HTTP: ping,
predictions, every bad input, the protocol's corners (keep-alive, Expect: 100-continue, chunked bodies, slow and
idle clients), a bounded load test, the log, and a clean stop."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fake_experiment import make_package
from pneumoseg.data import rle
from pneumoseg.serve import handler as serving
from pneumoseg.serve import package as package_format
from pneumoseg.data.dicom import DicomTags, write_jpeg_dicom
from pneumoseg.serve.server import InferenceService

HOST = "127.0.0.1"
STARTUP_SECONDS = 180  # importing torch and loading the models, on a busy 2-core machine
REQUEST_TIMEOUT = 2  # the server's --request-timeout in these tests
RNG = np.random.default_rng(11)


@dataclass
class Server:
    port: int
    log: Path
    process: subprocess.Popen
    package: Path


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, image)
    return buffer.getvalue()


def _dicom(folder: Path, size: int = 256) -> bytes:
    uid = "1.2.276.0.7230010.3.1.4.7.7"
    path = folder / f"{uid}.dcm"
    write_jpeg_dicom(path, RNG.integers(0, 256, (size, size), dtype=np.uint8),
                     DicomTags(uid, "1.2.276.0.7230010.3.1.2.7", "1.2.276.0.7230010.3.1.3.7", "p7"))
    return path.read_bytes()


PNG = _png(RNG.integers(0, 256, (64, 48), dtype=np.uint8))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server on a free loopback port, serving a tiny packaged model; stopped after the module."""
    root = tmp_path_factory.mktemp("serve")
    _, package = make_package(root)
    log = root / "server.log"
    command = [sys.executable, "-m", "pneumoseg.serve", "--model", str(package), "--port", "0", "--max-body-mb", "1",
               "--request-timeout", str(REQUEST_TIMEOUT), "--keep-alive", "30", "--workers", "4"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
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


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, http.client.HTTPMessage, bytes]:
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
        return _read_until_closed(sock)


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_head(sock: socket.socket) -> bytes:
    """Read one response head (up to the blank line)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


@pytest.fixture(scope="module")
def model(server):
    """The same package loaded in this process: what the server's answers must equal."""
    with package_format.open_package(server.package) as model_dir:
        return package_format.load_package(model_dir, device="cpu")


def expected_answer(model, body: bytes, content_type: str) -> dict:
    result = serving.predict_fn(serving.input_fn(body, content_type), model)
    return json.loads(serving.output_fn(result, "application/json")[0])


def test_ping(server):
    status, headers, body = call(server.port, "GET", "/ping")
    manifest = json.loads((server.package.parent / "manifest.json").read_text())
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ready", "model": "tiny", "version": manifest["version"]}


def test_service_answers_503_until_the_model_is_loaded():
    service = InferenceService()
    assert service.ping().status == 503
    assert service.invoke(PNG, "image/png", None).status == 503


def test_dicom_prediction_equals_the_handlers(server, model, tmp_path):
    body = _dicom(tmp_path)
    status, headers, answer = call(server.port, "POST", "/invocations", body, {"Content-Type": "application/dicom"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(answer) == expected_answer(model, body, "application/dicom")
    assert json.loads(answer)["ImageId"] == "1.2.276.0.7230010.3.1.4.7.7"


@pytest.mark.real_data
def test_real_sample_dicom(server, model, siim_dir):
    path = sorted((siim_dir / "sample_images").glob("*.dcm"))[0]
    body = path.read_bytes()
    status, _, answer = call(server.port, "POST", "/invocations", body, {"Content-Type": "application/dicom"})
    answer = json.loads(answer)
    assert status == 200
    assert answer == expected_answer(model, body, "application/dicom")
    assert answer["ImageId"] == path.stem and (answer["height"], answer["width"]) == (1024, 1024)
    status, headers, png = call(server.port, "POST", "/invocations", body,
                                {"Content-Type": "application/dicom", "Accept": "image/png"})
    mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert status == 200 and headers["Content-Type"] == "image/png"
    np.testing.assert_array_equal(mask == 255, rle.decode(answer["EncodedPixels"], 1024, 1024))


def _truncated_dicom(folder: Path) -> bytes:
    return _dicom(folder)[:-3000]


# name -> (method, path, headers, body maker taking a scratch folder, status, what the error says)
BAD_REQUESTS = {
    "corrupt dicom": ("POST", "/invocations", {"Content-Type": "application/dicom"},
                      lambda _: RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes(), 400, "DICM"),
    "truncated dicom": ("POST", "/invocations", {"Content-Type": "application/dicom"}, _truncated_dicom, 400,
                        "cannot read DICOM"),
    "truncated png": ("POST", "/invocations", {"Content-Type": "image/png"}, lambda _: PNG[:-100], 400, "image/png"),
    "empty body": ("POST", "/invocations", {"Content-Type": "application/dicom"}, lambda _: b"", 400, "empty"),
    "truncated npy": ("POST", "/invocations", {"Content-Type": "application/x-npy"},
                      lambda _: _npy(np.zeros((9, 9), np.uint8))[:-5], 400, "truncated"),
    "unsupported content type": ("POST", "/invocations", {"Content-Type": "text/plain"}, lambda _: b"hello", 415,
                                 "not read"),
    "no content type": ("POST", "/invocations", {}, lambda _: PNG, 415, "not read"),
    "too large": ("POST", "/invocations", {"Content-Type": "image/png"}, lambda _: b"\0" * (2 << 20), 413,
                  "more than"),
    "unacceptable accept": ("POST", "/invocations", {"Content-Type": "image/png", "Accept": "text/html"},
                            lambda _: PNG, 406, "Accept"),
    "unknown endpoint": ("POST", "/predict", {"Content-Type": "image/png"}, lambda _: PNG, 404, "/invocations"),
    "unknown page": ("GET", "/", {}, lambda _: None, 404, "/ping"),
    "unsupported method": ("PUT", "/invocations", {"Content-Type": "image/png"}, lambda _: PNG, 405, "PUT"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_json_reason_and_the_server_goes_on(server, case, tmp_path):
    method, path, headers, make, expected, reason = BAD_REQUESTS[case]
    status, answer_headers, body = call(server.port, method, path, make(tmp_path), headers)
    assert status == expected
    assert answer_headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["status"] == expected and reason in answer["error"]
    assert call(server.port, "GET", "/ping")[0] == 200


@pytest.mark.parametrize("request_bytes", [
    b"NOT AN HTTP REQUEST\r\n\r\n",
    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: lots\r\n\r\n",
    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_requests_get_400_and_are_closed(server, request_bytes):
    answer = raw_exchange(server.port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    assert json.loads(body)["status"] == 400


def test_the_unread_body_of_a_get_is_not_taken_for_the_next_request(server):
    answer = raw_exchange(server.port, b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n"
                                       b"GET /nothing HTTP/1.1\r\nX: y\r\n\r\n"
                                       b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [int(status) for status in re.findall(rb"HTTP/1.1 (\d{3})", answer)] == [200, 200]


def test_expect_100_continue_is_answered_before_the_body(server):
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(PNG))
        assert _read_head(sock).startswith(b"HTTP/1.1 100 Continue")  # a timeout here is the stall
        sock.sendall(PNG)
        head = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(re.search(rb"(?i)Content-Length: (\d+)", head).group(1))
        body = b""
        while len(body) < length:
            body += sock.recv(length - len(body))
        assert json.loads(body)["height"] == 64


@pytest.mark.parametrize("headers, status", [
    (b"Content-Type: image/png\r\nContent-Length: 5000000", b"413"),
    (b"Content-Type: text/csv\r\nContent-Length: 10", b"415"),
])
def test_expect_100_continue_gets_the_final_answer_at_once_when_headers_decide(server, headers, status):
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + headers + b"\r\n\r\n")
        head = _read_head(sock)  # no body sent: the answer must come anyway
        assert head.split(b" ")[1] == status


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    try:
        conn.request("GET", "/ping")
        assert conn.getresponse().read() and conn.sock is not None
        first = conn.sock
        for body, content_type in [(PNG, "image/png"), (_npy(np.zeros((5, 7), np.uint8)), "application/x-npy")]:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Connection") != "close"
            response.read()
            assert conn.sock is first, "the connection was closed and reopened"
        # A 4xx on a request whose body was read keeps the connection too.
        conn.request("POST", "/invocations", body=b"", headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        assert response.status == 400
        response.read()
        conn.request("GET", "/ping")
        assert conn.getresponse().status == 200 and conn.sock is first
    finally:
        conn.close()


def test_chunked_body(server, model):
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    try:
        chunks = [PNG[i:i + 1000] for i in range(0, len(PNG), 1000)]
        conn.request("POST", "/invocations", body=iter(chunks), headers={"Content-Type": "image/png"},
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read()) == expected_answer(model, PNG, "image/png")
    finally:
        conn.close()


def test_a_stalled_body_gets_408_within_the_request_timeout(server):
    with socket.create_connection((HOST, server.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000"
                     b"\r\n\r\n" + PNG[:10])
        answer = _read_until_closed(sock)
        waited = time.monotonic() - started
    assert b" 408 " in answer.split(b"\r\n")[0]
    assert REQUEST_TIMEOUT * 0.9 <= waited < REQUEST_TIMEOUT + 20


def test_idle_connections_hold_no_worker(server):
    # More idle keep-alive connections than the server's 4 workers: a new request is still served.
    idle = [socket.create_connection((HOST, server.port), timeout=10) for _ in range(10)]
    try:
        status, _, _ = call(server.port, "POST", "/invocations", PNG, {"Content-Type": "image/png"}, timeout=30)
        assert status == 200
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.slow
def test_load_8_clients_200_requests(server, tmp_path):
    """8 concurrent keep-alive clients, 200 requests in all, of every input type: no error, and the server still
    answers afterwards."""
    bodies = [(PNG, "image/png"), (_npy(RNG.integers(0, 256, (50, 40), dtype=np.uint8)), "application/x-npy"),
              (_dicom(tmp_path, size=128), "application/dicom")]

    def client(index: int) -> list[int]:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
        statuses = []
        try:
            for k in range(25):
                body, content_type = bodies[(index + k) % len(bodies)]
                conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
                response = conn.getresponse()
                json.loads(response.read())
                statuses.append(response.status)
        finally:
            conn.close()
        return statuses

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for result in pool.map(client, range(8)) for s in result]
    assert len(statuses) == 200 and set(statuses) == {200}
    assert call(server.port, "GET", "/ping")[0] == 200


def test_one_log_line_per_request(server):
    # A request's line is written after its answer is sent: let the lines of earlier tests' requests land first.
    before, deadline = -1, time.monotonic() + 10
    while before != server.log.read_text().count("\n") and time.monotonic() < deadline:
        before = server.log.read_text().count("\n")
        time.sleep(0.3)
    call(server.port, "GET", "/ping")
    call(server.port, "POST", "/invocations", PNG, {"Content-Type": "image/png"})
    call(server.port, "POST", "/invocations", b"x", {"Content-Type": "text/plain"})
    time.sleep(0.5)
    lines = server.log.read_text().splitlines()[before:]
    pattern = r'127\.0\.0\.1 "(GET|POST) /\S+ HTTP/1\.1" (\d{3}) (\d+) B in, (\d+) B out, [\d.]+ ms'
    found = [re.search(pattern, line) for line in lines]
    assert [(m.group(1), m.group(2)) for m in found if m] == [("GET", "200"), ("POST", "200"), ("POST", "415")]
    assert int(found[1].group(3)) == len(PNG)


def test_sigterm_stops_the_server_cleanly(server):
    """Last of the module: the server finishes, logs "stopped" and exits 0."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    assert "stopped" in server.log.read_text()


@pytest.mark.slow
def test_a_missing_model_exits_with_an_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pneumoseg.serve", "--model", str(tmp_path / "none.tar.gz"),
                          "--port", "0"], capture_output=True, text=True, timeout=STARTUP_SECONDS,
                         env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "model package" in out.stderr and "not found" in out.stderr
