"""The test set a submission must cover: stage 02's test list (ImageId and original size) and the order of the
sample submission when there is one. Read by stage 05 and by the submission check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.data import inputs
from pneumoseg.data import labels as lb
from pneumoseg.errors import DataError
from pneumoseg.stage_table import command, run_first


def read_test_images(cfg: DictConfig, sample: Path | None) -> pd.DataFrame:
    """Stage 02's test list: ImageId, rows, cols, in submission order.

    Args:
        cfg: the resolved config.
        sample: the sample submission, whose every ImageId must be a test image; None without one.

    Raises:
        DataError: the list is missing, lacks a column, is empty, or lacks ImageIds of the sample submission
            (their DICOMs were not found, or they have training labels).
    """
    path = layout.test_images_path(cfg)
    if not path.is_file():
        raise DataError(f"{path} not found: {run_first('02')}")
    test = pd.read_csv(path, dtype={lb.ID_COLUMN: str})
    missing = [c for c in (lb.ID_COLUMN, "rows", "cols") if c not in test.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}: rerun {command('02')} --force")
    if test.empty:
        raise DataError(
            f"{path} lists no test image: give the test DICOMs (dicom-images-test/, or the images of a "
            f"sample submission) in {cfg.paths.input_dir} and rerun stages 01-02"
        )
    if sample is not None:
        known = set(test[lb.ID_COLUMN])
        absent = [i for i in lb.read_image_ids(sample) if i not in known]
        if absent:
            raise DataError(
                f"{len(absent)} ImageIds of the sample submission {sample} are not test images of "
                f"{path}, e.g. {absent[:3]}: their DICOMs are missing or they have training labels (see "
                f"{layout.unmatched_path(cfg)}). Add the missing DICOMs and rerun stages 01-02."
            )
    return test


def test_set(cfg: DictConfig) -> tuple[pd.DataFrame, list[str]]:
    """The test images (:func:`read_test_images`) and the ImageIds a submission must hold, in order: the sample
    submission's when the config has one, else the test list's."""
    sample = inputs.locate_sample_submission(cfg.data.sample_submission, cfg.paths.input_dir)
    test = read_test_images(cfg, sample)
    return test, lb.read_image_ids(sample) if sample else test[lb.ID_COLUMN].tolist()


def image_sizes(test: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """ImageId -> ``(rows, cols)`` of the original images of a test list."""
    return {i: (int(r), int(c)) for i, r, c in test[[lb.ID_COLUMN, "rows", "cols"]].itertuples(index=False)}
