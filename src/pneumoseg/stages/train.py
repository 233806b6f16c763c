"""Stage 03: train a model on each cross-validation fold and predict the fold's held-out images.

Reads the stage 01/02 outputs in ``${paths.prepared_dir}`` at ``train.image_size`` (see :mod:`pneumoseg.data.dataset`);
writes ``${paths.experiment_dir}/03_train/``:

* ``folds.csv`` (the folds trained on), ``config.yaml``, and ``done.json`` once every fold of ``train.folds``
  is complete;
* ``fold<k>/``: ``log.csv``, ``best_<rank>.pt``, ``checkpoints.csv``, ``last.pt``, ``oof/`` (see
  :mod:`pneumoseg.training.trainer`) and the fold's own ``done.json``.

Usage::

    python scripts/03_train.py --config CONFIG [--fold K|all] [--resume] [--force] [key=value ...]

A complete fold (its ``done.json`` matches the config) is skipped; ``--force`` retrains it from scratch. A fold
that was interrupted continues after its last finished epoch when its ``last.pt`` was written for the same
config (so rerunning ``run_all.sh`` after a kill picks up where it stopped), and starts afresh otherwise;
``--resume`` insists on continuing and fails if ``last.pt`` belongs to another config.

Folds are independent: ``--fold K`` trains fold K alone, so folds can run at the same time on different GPUs
(``CUDA_VISIBLE_DEVICES=1 python scripts/03_train.py --fold 1 ...``) or on machines sharing the output folder.
The stage's ``done.json`` appears when the last fold of ``train.folds`` finishes, whichever process that is.

Several GPUs on one fold: ``torchrun --nproc_per_node=N scripts/03_train.py ...`` (DistributedDataParallel:
nccl on GPUs, gloo on the CPU). The batch size is per process; only rank 0 writes files.

SageMaker: the same script is the entry point of a SageMaker PyTorch training job (``entry_point=
"scripts/03_train.py"``, ``source_dir`` the code-only bundle of ``scripts/make_sagemaker_source.py``). When
``SM_MODEL_DIR`` is set (see :mod:`pneumoseg.sagemaker.job`):

* ``SM_CHANNEL_TRAIN`` (the ``train`` input channel: a copy of a prepared folder, i.e. its ``01_convert/`` and
  ``02_labels/``) becomes ``paths.prepared_dir``;
* the stage trains in ``/opt/ml/checkpoints`` (``paths.experiment_dir``); at the end the fold models
  (``fold<k>/best_<rank>.pt`` with ``checkpoints.csv``), ``folds.csv`` and the resolved ``config.yaml`` go to
  ``SM_MODEL_DIR`` (``model.tar.gz``), laid out like ``03_train/``, and the logs, OOF maps, tables and completion
  records to ``SM_OUTPUT_DATA_DIR/03_train/`` (``output.tar.gz``), without checkpoints
  (:mod:`pneumoseg.sagemaker.outputs`); ``scripts/import_sagemaker_job.py`` puts both back into a local
  ``03_train/``;
* hyperparameters arrive as ``--key value`` arguments: ``--config configs/siim_unet_r34_512.yaml --fold all
  --train.epochs 3`` is the same as ``train.epochs=3``; ``--force True`` and ``--resume false`` work too;
* a failure the user can fix is also written to ``/opt/ml/output/failure``: SageMaker's FailureReason;
* several GPUs: ``distribution={"torch_distributed": {"enabled": True}}`` runs the script under torchrun, one
  process per GPU (``SM_NUM_GPUS``); without it one GPU is used. The README has the SDK snippet.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pneumoseg import layout, stage_table
from pneumoseg.cli import read_flag, stage_parser
from pneumoseg.data.dataset import PreparedData
from pneumoseg.errors import ConfigError
from pneumoseg.io import content_hash, write_csv
from pneumoseg.logs import place
from pneumoseg.modeling.checkpoints import LAST_FILE
from pneumoseg.modeling.device import set_cpu_threads
from pneumoseg.sagemaker.arguments import JobParser
from pneumoseg.sagemaker.job import in_job
from pneumoseg.sagemaker.outputs import export_outputs
from pneumoseg.sagemaker.tuning import oof_line
from pneumoseg.stage_table import DONE_FILE
from pneumoseg.stages.record import StageRecord, stored_summary
from pneumoseg.training.distributed import DistContext, distributed
from pneumoseg.training.phases import fit_phases, plan_phases

log = logging.getLogger(__name__)

STAGE_NAME = stage_table.stage("03").name
SECTIONS = ("seed", "model", "loss", "optimizer", "scheduler", "sampler", "augment", "train", "tta")
DESCRIPTION = "Stage 03: train a model per cross-validation fold and predict each fold's held-out images."


def run(
    cfg: DictConfig,
    force: bool = False,
    folds: Sequence[int] | str | None = None,
    resume: bool | str = "auto",
    job_environ: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train the requested folds; see the module docstring.

    Args:
        cfg: the resolved config.
        force: retrain folds that are already complete.
        folds: the folds this process trains: a list, ``"all"``, or None for ``train.folds``.
        resume: ``"auto"``: continue interrupted folds from a ``last.pt`` of the same config; True: continue and
            fail on a ``last.pt`` of another config; False: start afresh.
        job_environ: inside a SageMaker job, its environment: at the end the models are copied to its
            ``SM_MODEL_DIR`` and the rest to its ``SM_OUTPUT_DATA_DIR``
            (:func:`pneumoseg.sagemaker.outputs.export_outputs`).

    Returns:
        ``{"folds": {fold: summary}, "complete": bool}``; ``complete`` when every fold of ``train.folds`` is done.
    """
    if force and resume is True:
        raise ConfigError("--force retrains from scratch and --resume continues: give one of them")
    if int(cfg.train.epochs) < 1:
        raise ConfigError(f"train.epochs must be at least 1, got {cfg.train.epochs}")
    plan_phases(cfg)  # a bad phase fails now, before any training
    threads = set_cpu_threads(cfg.train.get("torch_threads"), "train.torch_threads", int(cfg.train.num_workers))
    log.info("%s: %d torch threads (train.torch_threads=%s)", STAGE_NAME, threads, cfg.train.get("torch_threads"))
    folder = layout.train_dir(cfg)
    data = PreparedData.load(cfg.paths.prepared_dir, int(cfg.train.image_size))
    folds_csv = layout.folds_path(cfg)
    planned = layout.select_folds(cfg.train.folds, data.fold_numbers(), "train.folds", folds_csv)
    requested = planned if folds is None else layout.select_folds(folds, data.fold_numbers(), "--fold", folds_csv)
    record = stage_record(cfg)
    inputs = record.inputs

    with distributed(str(cfg.train.device)) as ctx:
        force = ctx.broadcast(record.redo(force, scope=f"folds {requested}") if ctx.is_main else force)
        if ctx.broadcast(record.skip_if_complete(force) and set(requested) <= set(planned)):
            summaries, complete = _stored_summaries(folder, requested), True
        else:
            summaries = _train_folds(record, data, requested, ctx, force, False if force else resume)
            complete = all(_fold_record(cfg, inputs, fold).is_complete() for fold in planned)
            if ctx.is_main and not complete:  # the requested folds are done: so is a forced run of them
                record.finish_forced_run()
            if ctx.is_main and complete:
                fold_summaries = _stored_summaries(folder, planned)
                record.finish({"folds": planned, "fold_summaries": fold_summaries})
                log.info(
                    oof_line(_oof_dice(fold_summaries), sum(s["n_val"] for s in fold_summaries.values()), list(planned))
                )
            elif ctx.is_main:
                done = [f for f in planned if _fold_record(cfg, inputs, f).is_complete()]
                log.info(
                    "%s: folds %s are done; the stage completes when all of train.folds %s are",
                    STAGE_NAME,
                    done,
                    planned,
                )
        if ctx.is_main and job_environ is not None:
            export_outputs(folder, job_environ)
        ctx.barrier()
    return {"folds": summaries, "complete": complete}


def _oof_dice(fold_summaries: dict[int, dict]) -> float:
    """The competition dice over every held-out image: each fold's best ``val_dice`` weighted by its images."""
    total = sum(s["n_val"] for s in fold_summaries.values())
    return sum(s["best"]["val_dice"] * s["n_val"] for s in fold_summaries.values()) / max(total, 1)


def _train_folds(
    record: StageRecord, data: PreparedData, folds: Sequence[int], ctx: DistContext, force: bool, resume: bool | str
) -> dict[int, dict]:
    """Train each fold of ``folds`` that is not complete (or all with ``force``) -> the fold summaries.

    Args:
        record: the stage's record; its config and inputs make each fold's record.
        data: the prepared images, masks and folds.
        folds: the folds this process trains.
        ctx: the distributed context (only rank 0 writes).
        force: retrain complete folds too.
        resume: as for :func:`run`.
    """
    cfg, inputs = record.cfg, record.inputs
    if ctx.is_main and force:
        # A forced run that is stopped is continued by a plain resume: no fold may look finished or resumable
        # from before it.
        for fold in folds:
            for name in (DONE_FILE, LAST_FILE):
                (layout.fold_dir(cfg, fold) / name).unlink(missing_ok=True)
    if ctx.is_main:
        record.start()
        write_csv(layout.train_folds_path(cfg), data.folds)
    ctx.barrier()
    summaries = {}
    for fold in folds:
        fold_record = _fold_record(cfg, inputs, fold)
        if ctx.broadcast(fold_record.skip_if_complete(force)):
            summaries[fold] = _stored_summaries(record.folder, [fold])[fold]
            continue
        if ctx.is_main:
            fold_record.done_path.unlink(missing_ok=True)
            fold_record.folder.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        with place(f"fold {fold}"):
            summaries[fold] = fit_phases(
                cfg,
                data,
                fold,
                fold_record.folder,
                ctx,
                resume,
                fold_record.key,
                lambda size: PreparedData.load(cfg.paths.prepared_dir, size),
            )
        if ctx.is_main:
            fold_record.finish(summaries[fold])
        ctx.barrier()
    return summaries


def stage_record(cfg: DictConfig) -> StageRecord:
    """The stage's completion record: its config sections and the hash of the prepared ``folds.csv``."""
    # The crop keys live in the data section, which the stage does not fingerprint whole; only when set, so that
    # runs without crops keep their fingerprints.
    crop = {key: cfg.data[key] for key in ("train_crop", "crop_lesion_share") if cfg.data.get("train_crop")}
    return StageRecord(
        STAGE_NAME, layout.train_dir(cfg), cfg, SECTIONS, {"folds_sha256": content_hash(layout.folds_path(cfg)), **crop}
    )


def _fold_record(cfg: DictConfig, inputs: dict, fold: int) -> StageRecord:
    """The completion record of one fold: the stage's sections and inputs, plus the fold number."""
    return StageRecord(f"{STAGE_NAME} fold {fold}", layout.fold_dir(cfg, fold), cfg, SECTIONS, {**inputs, "fold": fold})


def _stored_summaries(folder: Path, folds: Sequence[int]) -> dict[int, dict]:
    return {fold: stored_summary(layout.fold_dir(folder, fold)) for fold in folds}


def _resume_flag(value: str) -> bool | str:
    """``--resume``'s value: ``auto``, or a word of the true/false vocabulary (:func:`pneumoseg.cli.read_flag`)."""
    if value.lower() == "auto":
        return "auto"
    try:
        return read_flag(value, "--resume")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, not {value!r}") from None


def parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """``--config``, ``--force``, overrides, plus ``--fold K|all`` and ``--resume`` (``--resume true`` too), and
    SageMaker's hyperparameters (:class:`pneumoseg.sagemaker.arguments.JobParser`).

    Args:
        description: the ``--help`` description.
    """
    result = JobParser(
        description=description,
        parents=[stage_parser(description)],
        add_help=False,
        epilog="Any other --key value (SageMaker's hyperparameters) is read as the override "
        "key=value; under torchrun every process trains its share of each fold.",
    )
    result.add_argument(
        "--fold", default=None, help="fold(s) to train in this process: K, K,L or all (default: train.folds)"
    )
    result.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default="auto",
        type=_resume_flag,
        help="insist on continuing interrupted folds from their last.pt (by default they continue "
        "when last.pt was written for the same config, and start afresh otherwise)",
    )
    return result


def stage(cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The script's entry: :func:`run` with the command line's folds, resume and SageMaker's model folder."""
    if (
        os.environ.get("SM_MODEL_DIR")
        and int(os.environ.get("SM_NUM_GPUS", "0")) > 1
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
    ):
        log.warning(
            "SM_NUM_GPUS=%s but this is a single process: enable the torch_distributed launcher to use every GPU",
            os.environ["SM_NUM_GPUS"],
        )
    return run(
        cfg, force=args.force, folds=args.fold, resume=args.resume, job_environ=dict(os.environ) if in_job() else None
    )
