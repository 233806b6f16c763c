"""The model package inside the real SageMaker PyTorch inference stack: TorchServe 0.12 (Java) with the
sagemaker-pytorch-inference toolkit's handler service, on loopback ports, as the container runs it (the package
extracted, its code/ on PYTHONPATH, the toolkit's TorchServe properties). The stack is installed once into
``.venv-torchserve/`` from tests/requirements-torchserve.txt, beside the project's ``.venv`` whose torch it reuses;
the test is skipped where Java is missing or the install fails. The toolkit's container entry point itself is not
run: it writes /etc/sagemaker-ts.properties and binds every interface."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from fake_experiment import make_package

pytestmark = pytest.mark.slow

REQUIREMENTS = ROOT / "tests" / "requirements-torchserve.txt"
VENV = ROOT / ".venv-torchserve"
HOST = "127.0.0.1"
STARTUP_SECONDS = 240
MAX_REQUEST_BYTES = 16 * 2**20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def stack_python() -> Path:
    """The Python of ``.venv-torchserve``, (re)installed when the requirements file changed."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java (17), which is not on this machine")
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not python.exists() or not stamp.exists() or stamp.read_text() != wanted:
        base = Path(getattr(sys, "_base_executable", sys.executable))
        try:
            subprocess.run(
                [str(base), "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True, timeout=120
            )
            # The project's environment behind this one: its torch (gigabytes) is reused, not downloaded again.
            site = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            # Every site folder of this environment, also those a layered environment adds through a .pth.
            folders = dict.fromkeys(
                [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
            )
            Path(site, "pneumoseg_project_env.pth").write_text("\n".join(folders) + "\n")
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"cannot install the TorchServe stack into {VENV}: {exc}")
        stamp.write_text(wanted)
    return python


@pytest.fixture(scope="module")
def torchserve(stack_python, tmp_path_factory):
    """TorchServe serving the tiny package through the toolkit's handler service: ``(process, port)``."""
    root = tmp_path_factory.mktemp("torchserve")
    _, package = make_package(root)
    model_dir = root / "model"
    with tarfile.open(package) as archive:
        archive.extractall(model_dir, filter="data")
    ports = {name: _free_port() for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    default = subprocess.run(
        [
            str(stack_python),
            "-c",
            "import pkg_resources, sagemaker_pytorch_serving_container "
            "as s; print(open(pkg_resources.resource_filename(s.__name__, "
            "'/etc/default-ts.properties')).read())",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    config = root / "config.properties"
    config.write_text(
        default
        + "\n"
        + "\n".join(
            [
                f"inference_address=http://{HOST}:{ports['inference']}",
                f"management_address=http://{HOST}:{ports['management']}",
                f"metrics_address=http://{HOST}:{ports['metrics']}",
                f"grpc_inference_port={ports['grpc_inference']}",
                f"grpc_management_port={ports['grpc_management']}",
                "default_workers_per_model=1",
                "default_response_timeout=120",
                "default_service_handler=sagemaker_pytorch_serving_container.handler_service:handle",
            ]
        )
        + "\n"
    )
    (root / "store").mkdir()
    (root / "tmp").mkdir()
    env = {
        **os.environ,
        "PATH": f"{stack_python.parent}:{os.environ['PATH']}",
        "TMPDIR": str(root / "tmp"),
        "PYTHONPATH": str(model_dir / "code"),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "SAGEMAKER_BASE_DIR": str(root),
        "OMP_NUM_THREADS": "1",
        # The README's Batch Transform recipe: TorchServe's own body limit (6,553,500 bytes) raised.
        "TS_MAX_REQUEST_SIZE": str(MAX_REQUEST_BYTES),
        "TS_MAX_RESPONSE_SIZE": str(MAX_REQUEST_BYTES),
    }
    log = root / "torchserve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                str(stack_python.parent / "torchserve"),
                "--start",
                "--foreground",
                "--model-store",
                str(root / "store"),
                "--ts-config",
                str(config),
                "--models",
                f"model={model_dir}",
                "--disable-token-auth",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    try:
        yield process, ports["inference"], log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def _call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 120
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def _until_answered(
    process, port: int, log: Path, body: bytes, content_type: str = "application/dicom"
) -> tuple[int, bytes]:
    """The first real answer to ``body`` (TorchServe answers ping, and queues requests, while the model loads)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"TorchServe exited:\n{log.read_text()[-5000:]}"
        if _call(port, "GET", "/ping", timeout=5)[0] == 200:
            status, answer = _call(port, "POST", "/invocations", body, {"Content-Type": content_type})
            if status not in (0, 503):
                return status, answer
        time.sleep(1)
    raise AssertionError(f"TorchServe did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-5000:]}")


def _java_child(process: subprocess.Popen) -> int:
    """The TorchServe frontend (Java), which the toolkit sends SIGTERM to."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert children, "TorchServe started no Java process"
    return int(children[0])


def _noise_png(side: int, seed: int) -> bytes:
    """A PNG of noise, about ``side * side`` bytes (noise barely compresses)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_transform_s_records_and_a_body_past_torchserve_s_default_limit(torchserve):
    """Records one after another, as a Batch Transform sends them, each answered on one JSON line; a 7 MB record
    passes because the environment sets TS_MAX_REQUEST_SIZE (TorchServe's default refuses it)."""
    process, port, log = torchserve
    large = _noise_png(2700, 0)
    assert len(large) > 6_553_500
    records = [_noise_png(300, seed) for seed in range(1, 4)] + [large]
    _until_answered(process, port, log, records[0], "image/png")
    answers = [_call(port, "POST", "/invocations", body, {"Content-Type": "image/png"}) for body in records]
    assert [status for status, _ in answers] == [200] * 4, answers[-1][1][:500]
    lines = b"\n".join(body for _, body in answers).decode().splitlines()  # AssembleWith: Line
    assert [json.loads(line)["width"] for line in lines] == [300, 300, 300, 2700]


def test_the_package_in_torchserve_with_the_sagemaker_toolkit(torchserve, siim_dir):
    process, port, log = torchserve
    dicom = sorted((siim_dir / "sample_images").glob("*.dcm"))[0]
    status, answer = _until_answered(process, port, log, dicom.read_bytes())
    assert status == 200, answer
    result = json.loads(answer)
    assert result["ImageId"] == dicom.stem and (result["height"], result["width"]) == (1024, 1024)
    for body, headers, expected in [
        (b"\0" * 300, {"Content-Type": "application/dicom"}, 400),
        (b"hello", {"Content-Type": "text/csv"}, 415),
        (dicom.read_bytes(), {"Content-Type": "application/dicom", "Accept": "text/html"}, 406),
    ]:
        status, answer = _call(port, "POST", "/invocations", body, headers)
        assert status == expected, answer
        assert json.loads(answer)["status"] == expected and b"Traceback" not in answer
    os.kill(_java_child(process), signal.SIGTERM)
    assert process.wait(60) is not None
    assert _call(port, "GET", "/ping", timeout=5)[0] == 0
