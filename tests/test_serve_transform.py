"""Batch Transform and asynchronous inference: ``GET /execution-parameters``, the limits a transform job's
environment sets, JSON answers that join into JSON Lines, and bodies past the real-time limit where configured."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fake_experiment import make_package
from pneumoseg.errors import ConfigError
from pneumoseg.serve.server import Limits, ServerSettings, main, within_transform
from pneumoseg.serve.transform import TransformJob, execution_parameters, transform_job
from serve_client import call, running_server

MiB = 2**20


def _png(height: int, width: int, seed: int = 0) -> bytes:
    """A PNG of noise: it barely compresses, so its size is about ``height * width`` bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"SAGEMAKER_BATCH": "false"}, None),
        ({"SAGEMAKER_BATCH": "true"}, TransformJob(6, 1, "SINGLE_RECORD")),
        (
            {
                "SAGEMAKER_BATCH": "true",
                "SAGEMAKER_MAX_PAYLOAD_IN_MB": "50",
                "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "8",
                "SAGEMAKER_BATCH_STRATEGY": "MULTI_RECORD",
            },
            TransformJob(50, 8, "MULTI_RECORD"),
        ),
    ],
)
def test_a_transform_job_is_read_from_sagemakers_variables(environ, expected):
    assert transform_job(environ) == expected


@pytest.mark.parametrize(
    "name, value",
    [
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "101"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "0"),
        ("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "x"),
        ("SAGEMAKER_BATCH_STRATEGY", "EVERYTHING"),
    ],
)
def test_a_variable_sagemaker_would_not_set_is_refused_by_name(name, value):
    with pytest.raises(ConfigError, match=name):
        transform_job({"SAGEMAKER_BATCH": "true", name: value})


def test_execution_parameters_follow_the_workers_and_the_body_limit():
    assert execution_parameters(4, 6 * MiB) == {
        "MaxConcurrentTransforms": 4,
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": 6,
    }
    assert execution_parameters(2, 1024 * MiB)["MaxPayloadInMB"] == 100  # a transform's largest payload


def test_a_transform_sets_the_body_limit_and_a_queue_for_its_concurrency():
    settings = ServerSettings(workers=2, limits=Limits(max_body_bytes=6 * MiB, max_queue=0))
    assert within_transform(settings, None) is settings
    inside = within_transform(settings, TransformJob(max_payload_mb=20, max_concurrent=8, strategy="SINGLE_RECORD"))
    assert inside.limits.max_body_bytes == 20 * MiB and inside.workers + inside.limits.max_queue >= 8


def test_a_body_limit_past_the_asynchronous_limit_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "unused", "--max-body-mb", "2000"])
    assert "at most 1024" in capsys.readouterr().err


@pytest.mark.slow
def test_a_server_inside_a_transform_job(tmp_path, monkeypatch):
    _, package = make_package(tmp_path)
    job = {
        "SAGEMAKER_BATCH": "true",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "2",
        "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "6",
        "SAGEMAKER_BATCH_STRATEGY": "SINGLE_RECORD",
    }
    for name, value in job.items():
        monkeypatch.setenv(name, value)
    with running_server(package, tmp_path / "server.log", "--workers", "2", "--max-queue", "0") as server:
        status, _, answer = call(server.port, "GET", "/execution-parameters")
        assert status == 200
        assert json.loads(answer) == {
            "MaxConcurrentTransforms": 2,
            "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": 2,
        }
        assert call(server.port, "POST", "/invocations", _png(1800, 1800), {"Content-Type": "image/png"})[0] == 413

        records = [_png(1200, 1200, seed) for seed in range(6)]  # 1.4 MB each: under 2 MB
        with ThreadPoolExecutor(6) as pool:  # the job's 6 at once: no 503
            answers = list(
                pool.map(
                    lambda body: call(server.port, "POST", "/invocations", body, {"Content-Type": "image/png"}), records
                )
            )
        assert [status for status, _, _ in answers] == [200] * 6
        joined = b"\n".join(body for _, _, body in answers)  # AssembleWith: Line
        lines = joined.decode().splitlines()
        assert len(lines) == 6 and all(json.loads(line)["height"] == 1200 for line in lines)
    assert "in a Batch Transform job: records up to 2 MB, 6 at once" in (tmp_path / "server.log").read_text()


@pytest.mark.slow
def test_an_asynchronous_endpoint_takes_a_body_past_the_real_time_limit(tmp_path):
    _, package = make_package(tmp_path)
    body = _png(2700, 2700)  # about 7 MB: over 6 MiB
    assert len(body) > 6_553_500
    with running_server(package, tmp_path / "server.log", "--max-body-mb", "1024") as server:
        status, _, answer = call(server.port, "POST", "/invocations", body, {"Content-Type": "image/png"})
        assert status == 200 and json.loads(answer)["width"] == 2700
    with running_server(package, tmp_path / "default.log") as server:  # the default 6 MiB: refused
        assert call(server.port, "POST", "/invocations", body, {"Content-Type": "image/png"})[0] == 413
