"""Finding the challenge's input files: a ``data.*`` setting is a path, or ``auto`` to look for each release's
file name in the input folder."""

from __future__ import annotations

import os
from pathlib import Path

from pneumoseg.errors import DataError

# Searched for in this order by "auto"; the stage-2 files first because stage 2 relabelled the stage-1
# test images too, so when both are present the stage-2 file is the complete one.
TRAIN_LABEL_FILES = ("stage_2_train.csv", "train-rle.csv")
SAMPLE_SUBMISSION_FILES = ("stage_2_sample_submission.csv", "sample_submission.csv")
AUTO = "auto"


def locate_input_file(setting: str | None, input_dir: str | os.PathLike, candidates: tuple[str, ...]) -> Path | None:
    """Resolve a ``data.*`` file setting.

    Args:
        setting: ``None`` (no file), ``"auto"`` (the first of ``candidates`` found in ``input_dir``, then in
            its sub-folders, shallowest first), or a path (tried inside ``input_dir`` first, then as given).
        input_dir: ``paths.input_dir``.
        candidates: file names ``"auto"`` looks for, in order of preference.

    Returns:
        The file, or ``None`` when ``setting`` is ``None`` or ``"auto"`` finds nothing.

    Raises:
        DataError: an explicit path that does not exist.
    """
    if setting is None:
        return None
    input_dir = Path(input_dir)
    if setting != AUTO:
        for path in (input_dir / setting, Path(setting)):
            if path.is_file():
                return path
        raise DataError(
            f"file not found: {setting} (looked in {input_dir} and from {Path.cwd()}); "
            f"fix the path in the config, or set it to {AUTO}"
        )
    for name in candidates:
        if (input_dir / name).is_file():
            return input_dir / name
    found = [path for path in input_dir.rglob("*.csv") if path.name in candidates]
    if not found:
        return None
    return min(found, key=lambda path: (len(path.parts), candidates.index(path.name), str(path)))


def locate_train_labels(setting: str, input_dir: str | os.PathLike) -> Path:
    """The training label file of ``data.train_labels`` (see :func:`locate_input_file`).

    Raises:
        DataError: no label file, saying which file to put where.
    """
    if setting is None:
        raise DataError("data.train_labels is null; set it to auto or to the label CSV's path")
    path = locate_input_file(setting, input_dir, TRAIN_LABEL_FILES)
    if path is None:
        where = f"{input_dir}" if Path(input_dir).is_dir() else f"{input_dir} (which does not exist)"
        raise DataError(
            f"no training label file in {where}: put the challenge's train-rle.csv (stage 1) or "
            f"stage_2_train.csv (stage 2) there, or set data.train_labels to the file's path"
        )
    return path


def locate_sample_submission(setting: str | None, input_dir: str | os.PathLike) -> Path | None:
    """The sample submission of ``data.sample_submission``, or ``None`` when there is none."""
    return locate_input_file(setting, input_dir, SAMPLE_SUBMISSION_FILES)
