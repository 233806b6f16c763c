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
"scripts/03_train.py"``, ``source_dir`` the project root, with ``requirements.txt``). When ``SM_MODEL_DIR`` is set:

* ``SM_CHANNEL_TRAIN`` (the ``train`` input channel: a copy of a prepared folder, i.e. its ``01_convert/`` and
  ``02_labels/``) becomes ``paths.prepared_dir``;
* ``SM_OUTPUT_DATA_DIR`` becomes ``paths.experiment_dir`` (logs, OOF predictions: ``output.tar.gz``);
* the fold models (``fold<k>/best_<rank>.pt`` with ``checkpoints.csv``), ``folds.csv`` and the resolved
  ``config.yaml`` are copied to ``SM_MODEL_DIR`` (``model.tar.gz``), laid out like ``03_train/`` so that
  :func:`pneumoseg.inference.tta.load_fold_models` reads either;
* hyperparameters arrive as ``--key value`` arguments: ``--config configs/siim_unet_r34_512.yaml --fold all
  --train.epochs 3`` is the same as ``train.epochs=3``;
* several GPUs: ``distribution={"torch_distributed": {"enabled": True}}`` runs the script under torchrun, one
  process per GPU (``SM_NUM_GPUS``); without it one GPU is used.

For example, with the SageMaker Python SDK (the package lives in ``src/``, hence ``PYTHONPATH``)::

    from sagemaker.pytorch import PyTorch
    job = PyTorch(entry_point="scripts/03_train.py", source_dir=".", role=ROLE, instance_count=1,
                  instance_type="ml.g5.12xlarge", framework_version=..., py_version=...,
                  environment={"PYTHONPATH": "/opt/ml/code/src"},
                  distribution={"torch_distributed": {"enabled": True}},
                  hyperparameters={"config": "configs/siim_unet_r34_512.yaml", "fold": "all", "train.epochs": 30})
    job.fit({"train": "s3://BUCKET/prepared/siim/"})   # 01_convert/ and 02_labels/ of a prepared folder
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.modeling.checkpoints import CHECKPOINTS_FILE, best_files
from pneumoseg.cli import stage_parser
from pneumoseg.data.dataset import PreparedData
from pneumoseg.training.distributed import DistContext, distributed
from pneumoseg.errors import ConfigError
from pneumoseg.io import atomic_path, content_hash, write_csv
from pneumoseg.training.trainer import fit_fold
from pneumoseg.stages.record import StageRecord, stored_summary

log = logging.getLogger(__name__)

STAGE_NAME = "03_train"
SECTIONS = ("seed", "model", "loss", "optimizer", "scheduler", "sampler", "augment", "train", "tta")
DESCRIPTION = "Stage 03: train a model per cross-validation fold and predict each fold's held-out images."

# SageMaker's environment -> config keys (the training job's input channel and output folder).
SAGEMAKER_PATHS = {"SM_CHANNEL_TRAIN": "paths.prepared_dir", "SM_OUTPUT_DATA_DIR": "paths.experiment_dir"}


def run(cfg: DictConfig, force: bool = False, folds: Sequence[int] | str | None = None, resume: bool | str = "auto",
        model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the requested folds; see the module docstring.

    Args:
        cfg: the resolved config.
        force: retrain folds that are already complete.
        folds: the folds this process trains: a list, ``"all"``, or None for ``train.folds``.
        resume: ``"auto"``: continue interrupted folds from a ``last.pt`` of the same config; True: continue and
            fail on a ``last.pt`` of another config; False: start afresh.
        model_dir: when given (SageMaker's ``SM_MODEL_DIR``), copy the fold models and config there at the end.

    Returns:
        ``{"folds": {fold: summary}, "complete": bool}``; ``complete`` when every fold of ``train.folds`` is done.
    """
    if force and resume is True:
        raise ConfigError("--force retrains from scratch and --resume continues: give one of them")
    if force:
        resume = False
    if int(cfg.train.epochs) < 1:
        raise ConfigError(f"train.epochs must be at least 1, got {cfg.train.epochs}")
    folder = layout.train_dir(cfg)
    data = PreparedData.load(cfg.paths.prepared_dir, int(cfg.train.image_size))
    folds_csv = layout.folds_path(cfg)
    planned = layout.select_folds(cfg.train.folds, data.fold_numbers(), "train.folds", folds_csv)
    requested = planned if folds is None else layout.select_folds(folds, data.fold_numbers(), "--fold", folds_csv)
    inputs = {"folds_sha256": content_hash(folds_csv)}
    record = StageRecord(STAGE_NAME, folder, cfg, SECTIONS, inputs)

    with distributed(str(cfg.train.device)) as ctx:
        if ctx.broadcast(record.skip_if_complete(force) and set(requested) <= set(planned)):
            summaries, complete = _stored_summaries(folder, requested), True
        else:
            summaries = _train_folds(cfg, data, requested, record, inputs, ctx, force, resume)
            complete = all(_fold_record(cfg, inputs, fold).is_complete() for fold in planned)
            if ctx.is_main and complete:
                record.finish({"folds": planned, "fold_summaries": _stored_summaries(folder, planned)})
            elif ctx.is_main:
                done = [f for f in planned if _fold_record(cfg, inputs, f).is_complete()]
                log.info("%s: folds %s are done; the stage completes when all of train.folds %s are",
                         STAGE_NAME, done, planned)
        if ctx.is_main and model_dir is not None:
            export_models(folder, Path(model_dir))
        ctx.barrier()
    return {"folds": summaries, "complete": complete}


def _train_folds(cfg: DictConfig, data: PreparedData, folds: Sequence[int], record: StageRecord, inputs: dict,
                 ctx: DistContext, force: bool, resume: bool | str) -> dict[int, dict]:
    """Train each fold of ``folds`` that is not complete (or all with ``force``) -> the fold summaries."""
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
        summaries[fold] = fit_fold(cfg, data, fold, fold_record.folder, ctx, resume=resume,
                                   fingerprint=fold_record.key)
        if ctx.is_main:
            fold_record.finish(summaries[fold])
        ctx.barrier()
    return summaries


def _fold_record(cfg: DictConfig, inputs: dict, fold: int) -> StageRecord:
    """The completion record of one fold: the stage's sections and inputs, plus the fold number."""
    return StageRecord(f"{STAGE_NAME} fold {fold}", layout.fold_dir(cfg, fold), cfg, SECTIONS,
                       {**inputs, "fold": fold})



def _stored_summaries(folder: Path, folds: Sequence[int]) -> dict[int, dict]:
    return {fold: stored_summary(layout.fold_dir(folder, fold)) for fold in folds}


def export_models(folder: Path, model_dir: Path) -> None:
    """Copy what inference needs (config, folds, each fold's best checkpoints and their table) to ``model_dir``."""
    copies = [folder / "config.yaml", layout.train_folds_path(folder)]
    for fold_folder in layout.fold_dirs(folder).values():
        for checkpoints in layout.CHECKPOINT_SETS:
            where = layout.checkpoints_dir(fold_folder, checkpoints)
            files = best_files(where)
            copies += [*files, where / CHECKPOINTS_FILE] if files else []
    for path in copies:
        with atomic_path(model_dir / path.relative_to(folder)) as tmp:
            shutil.copyfile(path, tmp)
    log.info("%s: fold models copied to %s", STAGE_NAME, model_dir)


def sagemaker_arguments(argv: Sequence[str], known_options: set[str],
                        environ: dict[str, str] | None = None) -> list[str]:
    """Rewrite SageMaker-style ``--key value`` (or ``--key=value``) hyperparameters whose key is not an option of
    the script into ``key=value`` overrides, and add the overrides of SageMaker's path variables.

    Args:
        argv: the command-line arguments.
        known_options: the option strings the parser defines (``--config``, ``--fold``, ...).
        environ: the environment (default ``os.environ``); its ``SM_*`` paths apply only when ``SM_MODEL_DIR``
            is set, i.e. inside a SageMaker job.

    Returns:
        ``argv`` with the hyperparameters moved to the end as overrides, then the path overrides.
    """
    environ = os.environ if environ is None else environ
    kept, overrides = [], []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, has_value, value = token.partition("=")
        if token.startswith("--") and name not in known_options:
            if not has_value:
                if i + 1 >= len(tokens):
                    raise ConfigError(f"hyperparameter {token} has no value")
                value = tokens[i + 1]
                i += 1
            overrides.append(f"{name[2:]}={value}")
        else:
            kept.append(token)
        i += 1
    if environ.get("SM_MODEL_DIR"):
        overrides += [f"{key}={environ[var]}" for var, key in SAGEMAKER_PATHS.items() if environ.get(var)]
    return kept + overrides


class _TrainParser(argparse.ArgumentParser):
    """The stage's parser: also accepts SageMaker's ``--key value`` hyperparameters (see
    :func:`sagemaker_arguments`), and overrides before and after options (``a=1 --fold 0 b=2``)."""

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return self.parse_intermixed_args(sagemaker_arguments(argv, set(self._option_string_actions)), namespace)


def _flag(value: str) -> bool | str:
    if value.lower() == "auto":
        return "auto"
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or auto, not {value!r}")


def parser() -> argparse.ArgumentParser:
    """``--config``, ``--force``, overrides, plus ``--fold K|all`` and ``--resume`` (``--resume true`` too)."""
    result = _TrainParser(description=DESCRIPTION, parents=[stage_parser(DESCRIPTION)], add_help=False,
                          epilog="Any other --key value (SageMaker's hyperparameters) is read as the override "
                                 "key=value; under torchrun every process trains its share of each fold.")
    result.add_argument("--fold", default=None,
                        help="fold(s) to train in this process: K, K,L or all (default: train.folds)")
    result.add_argument("--resume", nargs="?", const=True, default="auto", type=_flag,
                        help="insist on continuing interrupted folds from their last.pt (by default they continue "
                             "when last.pt was written for the same config, and start afresh otherwise)")
    return result


def stage(cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The script's entry: :func:`run` with the command line's folds, resume and SageMaker's model folder."""
    if os.environ.get("SM_MODEL_DIR") and int(os.environ.get("SM_NUM_GPUS", "0")) > 1 \
            and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        log.warning("SM_NUM_GPUS=%s but this is a single process: enable the torch_distributed launcher to use "
                    "every GPU", os.environ["SM_NUM_GPUS"])
    return run(cfg, force=args.force, folds=args.fold, resume=args.resume,
               model_dir=os.environ.get("SM_MODEL_DIR") or None)

