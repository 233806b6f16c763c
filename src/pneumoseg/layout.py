"""Where the stages write: the names of every stage folder and of every file that another module reads.

Each path is a function of the resolved config (``paths.prepared_dir``, ``paths.experiment_dir``). The paths in
prepared data also take the prepared folder itself (``where`` = cfg or ``${paths.prepared_dir}``), and the paths in
a training folder the training folder itself (``where`` = cfg or a folder laid out like ``03_train``, such as
SageMaker's model folder); those inside one fold take the fold's folder::

    ${paths.prepared_dir}/
        01_convert/                       stage 01, pneumoseg.stages.convert
            images_<S>/<ImageId>.png      images_dir: 8-bit grey, S x S, for every S of prepare.sizes
            images_<S>/resize.json
            metadata.csv                  metadata_path
            errors.csv
        02_labels/                        labels_dir: stage 02, pneumoseg.stages.prepare_labels
            masks_<S>/<ImageId>.png       masks_dir: 0/255 masks of the training images
            labels.csv                    labels_path
            test_images.csv               test_images_path
            unmatched.csv                 unmatched_path
            folds.csv                     folds_path
            masks.key, data_report.md, report/
    ${paths.experiment_dir}/
        03_train/                         train_dir: stage 03, pneumoseg.stages.train
            folds.csv                     train_folds_path: the fold table trained on
            fold<k>/                      fold_dir, fold_dirs: pneumoseg.training.trainer
                log.csv                   fold_log_path
                oof/                      oof_dir: pneumoseg.data.probstore
                best_<rank>.pt, checkpoints.csv, last.pt (pneumoseg.modeling.checkpoints)
                ema/, averaged/           checkpoints_dir: the averaged weights (pneumoseg.training.averaging),
                                          each laid out like the fold folder (best_<rank>.pt, checkpoints.csv, oof/)
        04_search/                        search_dir: stage 04, pneumoseg.stages.search
            thresholds.json               thresholds_path
            ensemble.json                 ensemble_path: an ensemble's members and pairs scored, and its choice
            oof_report.json               oof_report_path
            candidates.csv, per_image.csv, oof_report.md, plots/
        05_predict/                       predict_dir: stage 05, pneumoseg.stages.predict
            submission.csv                submission_path
            test_score.json
        06_package/                       package_dir: stage 06, pneumoseg.stages.package
            model.tar.gz                  package_path
            manifest.json

Every stage folder (and every ``fold<k>/``) also holds ``config.yaml`` and ``done.json``
(:mod:`pneumoseg.stages.record`), and while it runs or after it failed the runner's markers
(:mod:`pneumoseg.stage_table`). The folder names are the stage table's. A file that only its own stage reads is named
in that stage's module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pneumoseg.errors import ConfigError
from pneumoseg.stage_table import stage

Where = DictConfig | str | os.PathLike

# The stage folders' names are the stage table's.
_CONVERT = stage("01").folder_name
_LABELS = stage("02").folder_name
_TRAIN = stage("03").folder_name
_SEARCH = stage("04").folder_name
_PREDICT = stage("05").folder_name
_PACKAGE = stage("06").folder_name
_FOLDS = "folds.csv"
_FOLD = "fold"
_MASKS = "masks_"
_ENSEMBLE = "ensemble.json"


def _prepared(where: Where) -> Path:
    return Path(where.paths.prepared_dir) if isinstance(where, DictConfig) else Path(where)


def _training(where: Where) -> Path:
    return train_dir(where) if isinstance(where, DictConfig) else Path(where)


def _numbered(folder: Path, prefix: str) -> dict[int, Path]:
    """The sub-folders ``<prefix><n>`` of ``folder``, by ``n`` in ascending order."""
    found = {}
    for path in folder.glob(f"{prefix}*"):
        suffix = path.name[len(prefix) :]
        if path.is_dir() and suffix.isdigit():
            found[int(suffix)] = path
    return dict(sorted(found.items()))


# Stage 01: ${paths.prepared_dir}/01_convert


def convert_dir(where: Where) -> Path:
    """Stage 01's folder."""
    return _prepared(where) / _CONVERT


def images_dir(where: Where, size: int) -> Path:
    """Stage 01's ``size`` x ``size`` PNGs, one ``<ImageId>.png`` per image."""
    return convert_dir(where) / f"images_{int(size)}"


def metadata_path(where: Where) -> Path:
    """Stage 01's ``metadata.csv``: the DICOM tags of every readable image."""
    return convert_dir(where) / "metadata.csv"


# Stage 02: ${paths.prepared_dir}/02_labels


def labels_dir(where: Where) -> Path:
    """Stage 02's folder."""
    return _prepared(where) / _LABELS


def masks_dir(where: Where, size: int) -> Path:
    """Stage 02's ``size`` x ``size`` 0/255 masks, one ``<ImageId>.png`` per training image."""
    return labels_dir(where) / f"{_MASKS}{int(size)}"


def mask_dirs(where: Where) -> dict[int, Path]:
    """The ``masks_<S>`` folders there are, by size."""
    return _numbered(labels_dir(where), _MASKS)


def labels_path(where: Where) -> Path:
    """Stage 02's ``labels.csv``: one row per training image."""
    return labels_dir(where) / "labels.csv"


def test_images_path(where: Where) -> Path:
    """Stage 02's ``test_images.csv``: the test images in submission order."""
    return labels_dir(where) / "test_images.csv"


def unmatched_path(where: Where) -> Path:
    """Stage 02's ``unmatched.csv``: the images and label rows that are neither train nor test."""
    return labels_dir(where) / "unmatched.csv"


def folds_path(where: Where) -> Path:
    """Stage 02's ``folds.csv``: the cross-validation fold of every training image."""
    return labels_dir(where) / _FOLDS


# Stage 03: ${paths.experiment_dir}/03_train


def train_dir(cfg: DictConfig) -> Path:
    """Stage 03's folder."""
    return Path(cfg.paths.experiment_dir) / _TRAIN


def train_dir_in(experiment_dir: str | os.PathLike) -> Path:
    """Stage 03's folder in an experiment's output folder (its ``paths.experiment_dir``)."""
    return Path(experiment_dir) / _TRAIN


def train_folds_path(where: Where) -> Path:
    """The ``folds.csv`` a training folder was trained on (stage 02's, copied when training starts)."""
    return _training(where) / _FOLDS


def fold_dir(where: Where, fold: int) -> Path:
    """The folder of fold ``fold`` in a training folder."""
    return _training(where) / f"{_FOLD}{int(fold)}"


def fold_dirs(where: Where) -> dict[int, Path]:
    """The ``fold<k>`` folders there are in a training folder, by fold number."""
    return _numbered(_training(where), _FOLD)


def fold_log_path(fold_folder: str | os.PathLike) -> Path:
    """A fold's ``log.csv`` (one row per epoch), in the fold's folder."""
    return Path(fold_folder) / "log.csv"


CHECKPOINT_SETS = ("best", "ema", "averaged")


def checkpoints_dir(fold_folder: str | os.PathLike, checkpoints: str = "best") -> Path:
    """Where one set of a fold's checkpoints lies, with its ``checkpoints.csv`` and ``oof/``: ``best`` (the trained
    weights) in the fold's folder itself, ``ema`` and ``averaged`` (see :mod:`pneumoseg.training.averaging`) in
    sub-folders of that name.

    Raises:
        ConfigError: a name that is not one of :data:`CHECKPOINT_SETS`.
    """
    if checkpoints not in CHECKPOINT_SETS:
        raise ConfigError(f"predict.checkpoints must be one of {', '.join(CHECKPOINT_SETS)}, not {checkpoints!r}")
    return Path(fold_folder) if checkpoints == "best" else Path(fold_folder) / checkpoints


def oof_dir(fold_folder: str | os.PathLike) -> Path:
    """A fold's store of out-of-fold probabilities, in the fold's folder."""
    return Path(fold_folder) / "oof"


# Stage 04: ${paths.experiment_dir}/04_search


def search_dir(cfg: DictConfig) -> Path:
    """Stage 04's folder."""
    return Path(cfg.paths.experiment_dir) / _SEARCH


def thresholds_path(cfg: DictConfig) -> Path:
    """Stage 04's chosen post-processing (read by inference and packaged for the server)."""
    return search_dir(cfg) / "thresholds.json"


def ensemble_path(cfg: DictConfig) -> Path:
    """Stage 04's ``ensemble.json`` on an ensemble config: every member and pair scored, and the members chosen
    (read by stages 05 and 06 and the leaderboard)."""
    return search_dir(cfg) / _ENSEMBLE


def ensemble_path_in(run_folder: str | os.PathLike) -> Path:
    """The ``ensemble.json`` of a run folder found on disk (``paths.experiment_dir`` of some config)."""
    return Path(run_folder) / _SEARCH / _ENSEMBLE


def oof_report_path(cfg: DictConfig) -> Path:
    """Stage 04's ``oof_report.json``: the out-of-fold scores."""
    return search_dir(cfg) / "oof_report.json"


# Stage 05: ${paths.experiment_dir}/05_predict


def predict_dir(cfg: DictConfig) -> Path:
    """Stage 05's folder."""
    return Path(cfg.paths.experiment_dir) / _PREDICT


def submission_path(cfg: DictConfig) -> Path:
    """Stage 05's ``submission.csv``."""
    return predict_dir(cfg) / "submission.csv"


# Stage 06: ${paths.experiment_dir}/06_package


def package_dir(cfg: DictConfig) -> Path:
    """Stage 06's folder."""
    return Path(cfg.paths.experiment_dir) / _PACKAGE


def package_path(cfg: DictConfig) -> Path:
    """Stage 06's ``model.tar.gz``."""
    return package_dir(cfg) / "model.tar.gz"


def select_folds(setting: Any, available: Iterable[int], name: str, source: str | os.PathLike) -> list[int]:
    """The folds a setting chooses, sorted, each checked against the folds there are.

    Args:
        setting: ``all`` (or None) for every fold, one fold number, ``"K,L"``, or a list of fold numbers.
        available: the folds there are (those of ``source``).
        name: the setting's name for messages, e.g. ``train.folds`` or ``--fold``.
        source: the fold table ``available`` comes from, for messages.

    Raises:
        ConfigError: a fold that is not a whole number, or that ``source`` does not have.
    """
    available = sorted({int(f) for f in available})
    if setting is None or str(setting) == "all":
        return available
    parts = [p for p in str(setting).split(",") if p.strip()] if isinstance(setting, (int, str)) else setting
    try:
        chosen = sorted({int(f) for f in parts})
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be 'all' or fold numbers, not {setting!r}") from None
    unknown = [f for f in chosen if f not in available]
    if unknown:
        raise ConfigError(
            f"{name} names fold(s) {unknown}, which {source} does not have (it has {available}); "
            f"fix {name}, or rerun the stage that wrote {Path(source).name} if the folds changed"
        )
    return chosen
