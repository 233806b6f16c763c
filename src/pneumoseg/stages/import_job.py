"""Continue locally after a SageMaker training job: unpack its ``model.tar.gz`` (the fold models, ``folds.csv``,
the resolved config) and ``output.tar.gz`` (``03_train/``: logs, OOF maps, completion records) into
``${paths.experiment_dir}/03_train/``, as a local stage 03 leaves it (without ``last.pt``), so that stages 04 to 06
run on it.

Usage::

    python scripts/import_sagemaker_job.py --config CONFIG --model model.tar.gz --output output.tar.gz
        [--force] [key=value ...]

CONFIG and the overrides must be the job's (its hyperparameters as ``key=value``) and the prepared data the job's
``train`` channel (``paths.prepared_dir``): the import checks that stage 03 is complete for them, as a later stage
does. ``--force`` replaces a ``03_train/`` that is already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.cli import stage_parser
from pneumoseg.errors import DataError
from pneumoseg.modeling.checkpoints import best_files
from pneumoseg.serve.archive import ArchiveKind, extract_archive
from pneumoseg.stage_table import DONE_FILE
from pneumoseg.stages.record import read_done
from pneumoseg.stages.train import STAGE_NAME, stage_record

log = logging.getLogger(__name__)

DESCRIPTION = "Unpack a SageMaker training job's model.tar.gz and output.tar.gz as this experiment's stage 03."
MAX_RECORD_BYTES = 1 << 20
"""Largest ``done.json`` read from a job's archive (stage 03 writes a few kilobytes)."""
# The keys of stage 03's done.json that the import and later stages read, with the types they must have.
_RECORD_TYPES = {"fingerprint": (str,), "sections": (list,), "inputs": (dict, type(None)), "summary": (dict,)}


def _check_record(path: Path, output: Path) -> None:
    """Check the job's ``done.json`` before anything reads it: a JSON object of at most :data:`MAX_RECORD_BYTES`,
    in UTF-8, with a string ``fingerprint`` and, where present, ``sections`` (strings), ``inputs`` and ``summary``
    of the types stage 03 writes.

    Raises:
        DataError: naming the file in ``output`` and what is wrong with it.
    """
    where = f"{path.name} of {output}"
    if not path.is_file():
        return  # the completeness check says that it is missing
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise DataError(
            f"{where} has {path.stat().st_size} bytes, more than the {MAX_RECORD_BYTES} stage 03 "
            f"writes: this is not the job's output.tar.gz; download it again"
        )
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise DataError(
            f"{where} is not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]}); download the job's "
            f"output.tar.gz again"
        ) from None
    if not isinstance(record, dict) or "fingerprint" not in record:
        raise DataError(
            f"{where} is not stage 03's completion record (a JSON object with a fingerprint); download "
            f"the job's output.tar.gz again"
        )
    wrong = [key for key, types in _RECORD_TYPES.items() if key in record and not isinstance(record[key], types)]
    if "sections" in record and isinstance(record["sections"], list):
        wrong += [] if all(isinstance(name, str) for name in record["sections"]) else ["sections"]
    if wrong:
        raise DataError(
            f"{where}: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not of the type stage 03 "
            f"writes; download the job's output.tar.gz again"
        )


# The job's archives, as the safe extractor names and reads them (SageMaker packs them with ``./`` names).
JOB_ARCHIVE = ArchiveKind(
    "SageMaker archive", "download the job's archive again (from the job's S3 output path)", dot_prefix=True
)


def _check(folder: Path, cfg: DictConfig, model: Path, output: Path) -> list[int]:
    """Check that the unpacked ``folder`` is a complete stage 03 for ``cfg`` -> its folds."""
    if read_done(folder) is None:
        raise DataError(
            f"{output} holds no {layout.train_dir(cfg).name}/{DONE_FILE}: the job did not finish stage 03, "
            f"or this is not its output.tar.gz"
        )
    if not layout.folds_path(cfg).is_file():
        raise DataError(
            f"{layout.folds_path(cfg)} not found: stages 04-06 need the prepared data the job trained on; "
            f"set paths.prepared_dir to a copy of its train channel (or run stages 01-02 here)"
        )
    if not stage_record(cfg).is_complete(folder):
        raise DataError(
            f"the job trained with another config or other prepared folds than --config and "
            f"{layout.folds_path(cfg)}: give the job's config and hyperparameters (as key=value), and "
            f"its train channel's data as paths.prepared_dir (compare {folder / 'config.yaml'})"
        )
    folds = list(layout.fold_dirs(folder))
    missing = [fold for fold, fold_folder in layout.fold_dirs(folder).items() if not best_files(fold_folder)]
    if not folds or missing:
        raise DataError(
            f"{model} lacks the checkpoints of fold(s) {missing or 'all'}: give the same job's model.tar.gz"
        )
    return folds


def run(cfg: DictConfig, model: str | Path, output: str | Path, force: bool = False) -> dict[str, Any]:
    """Unpack the job's archives into ``03_train/``; see the module docstring.

    Args:
        cfg: the resolved config (the job's).
        model: the job's ``model.tar.gz``.
        output: the job's ``output.tar.gz``.
        force: replace an existing ``03_train/``.

    Returns:
        ``{"folder", "folds", "files"}``.

    Raises:
        DataError: an archive is missing, unsafe or incomplete, the job's config differs, or ``03_train/``
            exists without ``force``.
    """
    model, output, folder = Path(model), Path(output), layout.train_dir(cfg)
    if folder.exists() and not force:
        raise DataError(f"{folder} already exists; use --force to replace it with the job's")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.import.", dir=folder.parent))
    try:
        files = extract_archive(output, staging, kind=JOB_ARCHIVE, prefix=folder.name) + extract_archive(
            model, staging, kind=JOB_ARCHIVE
        )
        _check_record(staging / DONE_FILE, output)
        folds = _check(staging, cfg, model, output)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: the job's folds %s unpacked into %s (%d files)", STAGE_NAME, folds, folder, len(files))
    return {"folder": str(folder), "folds": folds, "files": len(files)}


def parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """``--config``, ``--force``, overrides, plus ``--model`` and ``--output`` (the job's archives).

    Args:
        description: the ``--help`` description.
    """
    result = stage_parser(description)
    result.add_argument("--model", required=True, help="the job's model.tar.gz (the fold models)")
    result.add_argument("--output", required=True, help="the job's output.tar.gz (logs, OOF maps)")
    return result


def stage(cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The script's entry: :func:`run` with the command line's archives."""
    return run(cfg, args.model, args.output, force=args.force)
