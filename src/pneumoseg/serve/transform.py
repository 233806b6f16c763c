"""SageMaker Batch Transform and asynchronous inference: what the server tells a transform job and the limits it
takes from one.

A Batch Transform job sends each record (here: one X-ray file, ``SplitType: None``) as one ``POST /invocations``.
When the job leaves MaxConcurrentTransforms unset, SageMaker first asks a bring-your-own container
``GET /execution-parameters`` (:func:`execution_parameters`). Inside a transform the container's environment holds
``SAGEMAKER_BATCH`` (true), ``SAGEMAKER_MAX_PAYLOAD_IN_MB``, ``SAGEMAKER_BATCH_STRATEGY`` and
``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS`` (:func:`transform_job`): the body limit becomes the payload limit, and
the request queue is made at least as deep as the concurrency the job was given, so that none of its records is
answered 503. Asynchronous endpoints read payloads of up to 1 GB from S3: ``--max-body-mb`` accepts up to
:data:`ASYNC_MAX_BODY_MB`.

This module imports neither torch nor the server: :mod:`pneumoseg.serve.server` reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pneumoseg.errors import ConfigError

log = logging.getLogger(__name__)

EXECUTION_PARAMETERS = "/execution-parameters"
BATCH_MAX_PAYLOAD_MB = 100
"""The largest MaxPayloadInMB a Batch Transform job takes."""
ASYNC_MAX_BODY_MB = 1024
"""Asynchronous inference reads payloads of up to 1 GB from S3."""
SINGLE_RECORD = "SINGLE_RECORD"
_STRATEGIES = (SINGLE_RECORD, "MULTI_RECORD")
_TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class TransformJob:
    """What a Batch Transform job told the container.

    Attributes:
        max_payload_mb: the largest record the job sends, in MB (SageMaker's MB are MiB).
        max_concurrent: requests the job sends at once.
        strategy: ``SINGLE_RECORD`` or ``MULTI_RECORD`` (X-ray files are never split, so each request is one
            record either way).
    """

    max_payload_mb: int
    max_concurrent: int
    strategy: str


def _positive_int(environ: Mapping[str, str], name: str, default: int, most: int | None = None) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1 or (most is not None and int(raw) > most):
        bound = f" and at most {most}" if most is not None else ""
        raise ConfigError(f"{name}={raw!r} in the environment: expected a whole number at least 1{bound}")
    return int(raw)


def transform_job(
    environ: Mapping[str, str] | None = None, default_payload_mb: int = 6, default_concurrent: int = 1
) -> TransformJob | None:
    """The Batch Transform job the container runs in, from SageMaker's variables; None outside a transform.

    Args:
        environ: the environment (default ``os.environ``).
        default_payload_mb: MaxPayloadInMB when the job does not say (SageMaker's default is 6).
        default_concurrent: MaxConcurrentTransforms when the job does not say.

    Raises:
        ConfigError: a variable that is not what SageMaker sets (named, with what was expected).
    """
    environ = os.environ if environ is None else environ
    if environ.get("SAGEMAKER_BATCH", "").strip().lower() not in _TRUE:
        return None
    strategy = environ.get("SAGEMAKER_BATCH_STRATEGY", SINGLE_RECORD).strip().upper() or SINGLE_RECORD
    if strategy not in _STRATEGIES:
        raise ConfigError(f"SAGEMAKER_BATCH_STRATEGY={strategy!r} in the environment: expected one of {_STRATEGIES}")
    if strategy != SINGLE_RECORD:
        log.info(
            "SAGEMAKER_BATCH_STRATEGY is %s: X-ray files are not split, so each request is still one record", strategy
        )
    return TransformJob(
        max_payload_mb=_positive_int(environ, "SAGEMAKER_MAX_PAYLOAD_IN_MB", default_payload_mb, BATCH_MAX_PAYLOAD_MB),
        max_concurrent=_positive_int(environ, "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", default_concurrent),
        strategy=strategy,
    )


def execution_parameters(workers: int, max_body_bytes: int) -> dict[str, int | str]:
    """The answer to ``GET /execution-parameters``: as many concurrent transforms as the server has workers,
    one record per request, and the largest payload its body limit takes (whole MB, at most 100).

    Args:
        workers: the server's worker threads.
        max_body_bytes: the server's body limit.
    """
    return {
        "MaxConcurrentTransforms": int(workers),
        "BatchStrategy": SINGLE_RECORD,
        "MaxPayloadInMB": max(1, min(BATCH_MAX_PAYLOAD_MB, int(max_body_bytes // 2**20))),
    }
