"""Inside a SageMaker training job: where stage 03 reads and writes, what goes to which output, and the failure
reason SageMaker shows.

The training toolkit (``sagemaker-training``) sets ``SM_MODEL_DIR`` (packed into ``model.tar.gz``),
``SM_OUTPUT_DATA_DIR`` (packed into ``output.tar.gz``), ``SM_OUTPUT_DIR`` (where ``success`` / ``failure`` go) and
``SM_CHANNEL_<NAME>`` (the input channels). Stage 03 trains in a work folder beside the model folder,
``/opt/ml/checkpoints`` (SageMaker's default local checkpoint folder), so that neither archive receives ``last.pt``
or a second copy of the checkpoints; at the end :func:`export_outputs` copies the models to the model folder and
the logs, OOF maps and tables to the output data folder (:mod:`pneumoseg.sagemaker.outputs`).

This module imports neither torch nor pandas: stage 03's parser reads it (:mod:`pneumoseg.sagemaker.arguments`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from pneumoseg.io import atomic_path

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "/opt/ml/output"
FAILURE_FILE = "failure"
# SageMaker keeps the first 1,024 characters of the failure file as the job's FailureReason.
FAILURE_REASON_CHARS = 1024
WORK_DIR_NAME = "checkpoints"


def in_job(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a SageMaker training job (the toolkit sets ``SM_MODEL_DIR``)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("SM_MODEL_DIR"))


def work_dir(environ: Mapping[str, str]) -> Path:
    """The job's experiment folder: ``checkpoints/`` beside ``SM_MODEL_DIR`` (``/opt/ml/checkpoints``)."""
    return Path(environ["SM_MODEL_DIR"]).parent / WORK_DIR_NAME


def job_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    """The config overrides of a job's environment: ``paths.prepared_dir`` from the ``train`` channel,
    ``paths.experiment_dir`` the work folder (:func:`work_dir`). Empty outside a job.

    Args:
        environ: the environment (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    if not in_job(environ):
        return []
    overrides = [f"paths.prepared_dir={environ['SM_CHANNEL_TRAIN']}"] if environ.get("SM_CHANNEL_TRAIN") else []
    return overrides + [f"paths.experiment_dir={work_dir(environ)}"]


def failure_reason(exc: BaseException) -> str:
    """One line for SageMaker's FailureReason: the error's class and message (what is wrong and the fix)."""
    line = " ".join(f"{type(exc).__name__}: {exc}".split())
    return line[:FAILURE_REASON_CHARS]


def report_failure(exc: BaseException, environ: Mapping[str, str] | None = None) -> Path | None:
    """Inside a job, write :func:`failure_reason` to ``${SM_OUTPUT_DIR}/failure`` (atomically, one line) so that
    SageMaker shows it; the toolkit keeps a failure file that exists. Only the first process of each host
    (``LOCAL_RANK`` 0 or unset) writes: every host has its own ``/opt/ml/output``.

    Returns:
        The file written, or None outside a job or in another process.
    """
    environ = os.environ if environ is None else environ
    if not in_job(environ) or environ.get("LOCAL_RANK", "0") != "0":
        return None
    path = Path(environ.get("SM_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR) / FAILURE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(failure_reason(exc) + "\n")
    except OSError as error:  # the reason is also in the log; a read-only output folder must not hide it
        log.warning("could not write the failure reason to %s: %s", path, error)
        return None
    return path
