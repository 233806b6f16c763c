"""The challenge's submission file: writing it, checking it, and scoring it against labels.

A submission is a CSV with the header ``ImageId,EncodedPixels`` and one row per test image holding the run-length
string of its one (merged) mask, ``-1`` when the mask is empty. The challenge scored the ``relative`` form of
:mod:`pneumoseg.data.rle`; ``absolute`` (1-based starts) is available for other uses. When a sample submission is
given, the rows follow its order and its ImageIds exactly.

:func:`validate_submission` lists everything wrong with a file, one precise line per problem;
:func:`write_submission` writes through it, so a file that would not validate is never written.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pneumoseg.data import labels as lb
from pneumoseg.data import rle
from pneumoseg.data.testset import image_sizes, test_set
from pneumoseg.errors import DataError
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.io import atomic_path

HEADER = (lb.ID_COLUMN, lb.RLE_COLUMN)
# The challenge's images are all 1024 x 1024: the size assumed for an image whose size is not given.
DEFAULT_SIZE = (1024, 1024)

Sizes = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class Row:
    """One data row of a submission file: its 1-based line, ImageId and run-length string (both stripped)."""

    line: int
    image_id: str
    encoded: str


def write_submission(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    encoded: Sequence[str],
    expected_ids: Sequence[str] | None = None,
    sizes: Sizes | None = None,
    fmt: str = "relative",
) -> None:
    """Write a submission atomically, after checking it with :func:`validate_submission`.

    Args:
        path: the CSV to write.
        image_ids: one ImageId per row, in the order to write.
        encoded: the run-length string of each row (``-1`` for an empty mask), in ``fmt``.
        expected_ids: the ImageIds the file must hold, in the order it must hold them (a sample submission's);
            default ``image_ids`` themselves, which are then checked for repeats only.
        sizes: ``(rows, cols)`` of each image, against which its run-length string is checked;
            :data:`DEFAULT_SIZE` for an image not listed.
        fmt: ``relative`` or ``absolute``.

    Raises:
        DataError: the rows do not validate; the message lists the problems and nothing is written.
    """
    if len(image_ids) != len(encoded):
        raise ValueError(f"{len(image_ids)} ImageIds but {len(encoded)} run-length strings")
    frame = pd.DataFrame({lb.ID_COLUMN: list(image_ids), lb.RLE_COLUMN: list(encoded)})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
        # The written bytes are what gets checked, so the file on disk is exactly what validated.
        problems = validate_submission(tmp, list(image_ids) if expected_ids is None else expected_ids, sizes, fmt)
        if problems:
            raise DataError(
                f"the submission for {path} does not validate, so it was not written:\n" + format_problems(problems)
            )


def read_submission(path: str | os.PathLike) -> tuple[list[Row], list[str]]:
    """Read a submission's rows without judging their content.

    Returns:
        ``(rows, problems)``: the data rows, and problems with the file's form (missing file, bad header, rows
        without exactly two fields); rows of the wrong form are left out of ``rows``.
    """
    path = Path(path)
    if not path.is_file():
        return [], [f"{path}: file not found"]
    rows, problems = [], []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return [], [f"{path}: the file is empty; expected the header {','.join(HEADER)}"]
            delimiter = _other_delimiter(header)
            if delimiter:  # every row would be one field: say so once, not once a row
                return [], [
                    f"{path}: the fields are separated by {delimiter}, not commas; save the file as a "
                    f"comma-separated CSV with the header {','.join(HEADER)}"
                ]
            if tuple(header) != HEADER:
                problems.append(f"line 1: the header is {','.join(header)!r}; it must be exactly {','.join(HEADER)}")
            bad_lines = []
            for fields in reader:
                if len(fields) != 2:
                    bad_lines.append((reader.line_num, fields))
                    continue
                rows.append(Row(reader.line_num, fields[0].strip(), fields[1].strip()))
    except (UnicodeDecodeError, csv.Error) as exc:
        return rows, [*problems, f"{path}: not a readable UTF-8 CSV file ({exc})"]
    problems += _grouped(
        [
            f"line {line}: {len(fields)} fields ({','.join(fields)}); expected ImageId,EncodedPixels"
            for line, fields in bad_lines
        ],
        [f"line {line}" for line, _ in bad_lines],
        "lines do not have the two fields ImageId,EncodedPixels",
    )
    return rows, problems


_DELIMITERS = {";": "semicolons (;)", "\t": "tabs", "|": "vertical bars (|)"}


def _other_delimiter(header: list[str]) -> str | None:
    """The name of the delimiter a one-field header is split by (semicolons, tabs, bars), or None."""
    if len(header) != 1:
        return None
    return next((name for mark, name in _DELIMITERS.items() if mark in header[0]), None)


def _grouped(messages: list[str], items: list[str], summary: str, limit: int = 5) -> list[str]:
    """A problem that repeats, as one line: ``messages`` (one a case) when there is at most one case, else the count,
    ``summary`` and the first ``limit`` of ``items`` (each case in short)."""
    if len(messages) <= 1:
        return messages
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return [f"{len(messages)} {summary}; the first {min(limit, len(items))}: {', '.join(items[:limit])}{more}"]


def validate_submission(
    path: str | os.PathLike,
    expected: str | os.PathLike | Sequence[str],
    sizes: Sizes | None = None,
    fmt: str = "relative",
) -> list[str]:
    """Everything wrong with a submission file, one line per problem; an empty list when it is valid.

    Checked: the header; two fields per row; every expected ImageId present, none twice, none unexpected; the rows
    in the expected order; every run-length string ``-1`` or pairs that decode within the image (``fmt``).

    Args:
        path: the submission CSV.
        expected: a sample submission file (its ImageIds and order), or the expected ImageIds in order.
        sizes: ``(rows, cols)`` of each image; :data:`DEFAULT_SIZE` (the challenge's) for one not listed.
        fmt: the run-length form the file should use, ``relative`` (the challenge's) or ``absolute``.

    Raises:
        DataError: the sample submission cannot be read.
    """
    if isinstance(expected, (str, os.PathLike)):
        if not Path(expected).is_file():
            raise DataError(f"sample submission {expected} not found")
        expected_ids = lb.read_image_ids(expected)
    else:
        expected_ids = list(expected)
    rows, problems = read_submission(path)
    if problems and not rows:
        return problems  # no file, or nothing readable in it: listing every ImageId as missing would bury that
    problems += _id_problems(rows, expected_ids)
    sizes = sizes or {}
    bad = [(row, found) for row in rows for found in _rle_problems(row, sizes.get(row.image_id, DEFAULT_SIZE), fmt)]
    problems += _grouped(
        [found for _, found in bad],
        [found.split(", ImageId")[0] for _, found in bad],
        f"rows have EncodedPixels that are not valid {fmt} run-length strings (or -1)",
    )
    return problems


def _id_problems(rows: Sequence[Row], expected_ids: Sequence[str]) -> list[str]:
    """The ImageId problems of ``rows``: no ImageId, one twice, one not expected, an expected one without a row (each
    kind grouped when it repeats), else the first row out of the expected order."""
    wanted = set(expected_ids)
    first_line: dict[str, int] = {}
    blank, twice, unexpected = [], [], []
    for row in rows:
        if not row.image_id:
            blank.append(row)
        elif row.image_id in first_line:
            twice.append((row, first_line[row.image_id]))
        else:
            first_line[row.image_id] = row.line
            if row.image_id not in wanted:
                unexpected.append(row)
    missing = [(k, image_id) for k, image_id in enumerate(expected_ids) if image_id not in first_line]
    problems = [
        *_grouped(
            [f"line {row.line}: no ImageId" for row in blank],
            [f"line {row.line}" for row in blank],
            "lines have no ImageId",
        ),
        *_grouped(
            [
                f"line {row.line}: ImageId {row.image_id} again (first on line {first}); give one merged mask per image"
                for row, first in twice
            ],
            [f"line {row.line} ({row.image_id})" for row, _ in twice],
            "rows repeat an ImageId of an earlier row (give one merged mask per image)",
        ),
        *_grouped(
            [f"line {row.line}: ImageId {row.image_id} is not a test image" for row in unexpected],
            [f"line {row.line} ({row.image_id})" for row in unexpected],
            "rows are not of test images",
        ),
        *_grouped(
            [f"ImageId {image_id} (test image {k + 1} of {len(expected_ids)}) has no row" for k, image_id in missing],
            [image_id for _, image_id in missing],
            f"test images of {len(expected_ids)} have no row (write one per test image, -1 when empty)",
        ),
    ]
    if not problems:
        order = [row.image_id for row in rows]
        if order != list(expected_ids):
            k = next(i for i, (a, b) in enumerate(zip(order, expected_ids)) if a != b)
            problems.append(
                f"line {rows[k].line}: ImageId {order[k]} where the expected order has "
                f"{expected_ids[k]}; write the rows in the sample submission's order"
            )
    return problems


def _rle_problems(row: Row, size: tuple[int, int], fmt: str) -> list[str]:
    where = f"line {row.line}, ImageId {row.image_id}"
    if not row.encoded:
        return [f"{where}: EncodedPixels is empty; write {rle.EMPTY} for an image without pneumothorax"]
    try:
        rle.parse(row.encoded, int(size[0]), int(size[1]), fmt)
    except rle.RLEError as exc:
        return [f"{where}: {exc} (read as the {fmt} run-length form)"]
    return []


def format_problems(problems: Iterable[str], limit: int | None = 20) -> str:
    """The problems one per line, the first ``limit`` of them (None: all) and a count of the rest."""
    problems = list(problems)
    shown = problems if limit is None else problems[:limit]
    lines = [f"  {problem}" for problem in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


def check_submission(
    path: str | os.PathLike,
    sample: str | os.PathLike | None = None,
    cfg: DictConfig | None = None,
    fmt: str | None = None,
) -> tuple[bool, str]:
    """Validate a submission file against a sample submission or an experiment's test set; what
    ``scripts/validate_submission.py`` prints.

    Args:
        path: the submission CSV.
        sample: a sample submission: its ImageIds and order are expected, every image the challenge's
            1024 x 1024. Give it or ``cfg``.
        cfg: an experiment's resolved config: the test set of its stages 01-02 is expected (sizes from
            ``test_images.csv``; see :func:`pneumoseg.data.testset.test_set`).
        fmt: the run-length form; None: ``cfg.predict.fmt`` with a config, else ``relative``.

    Returns:
        ``(valid, text)``: the text names the file and either every problem, one a line, or the form it is in.

    Raises:
        DataError: the sample submission or the test list cannot be read.
        ValueError: neither or both of ``sample`` and ``cfg``.
    """
    expected: str | os.PathLike | Sequence[str]
    if cfg is not None and sample is None:
        test, expected = test_set(cfg)
        sizes, fmt = image_sizes(test), fmt or cfg.predict.fmt
    elif sample is not None and cfg is None:
        expected, sizes, fmt = sample, None, fmt or "relative"
    else:
        raise ValueError("give exactly one of sample and cfg")
    problems = validate_submission(path, expected, sizes, fmt)
    if problems:
        return False, f"{path}: {len(problems)} problem(s):\n{format_problems(problems, limit=None)}"
    return True, f"{path}: valid ({fmt} run-length form)"


def dice_by_image(
    path: str | os.PathLike, labels_csv: str | os.PathLike, sizes: Sizes | None = None, fmt: str = "relative"
) -> pd.Series:
    """The challenge's Dice of each labelled image, from a submission file and a label file.

    Args:
        path: a submission (validate it first: its rows must decode).
        labels_csv: the labels in any of the challenge's forms (one row per instance, unioned; see
            :mod:`pneumoseg.data.labels`); relative run-length form.
        sizes: ``(rows, cols)`` of each image; :data:`DEFAULT_SIZE` for one not listed.
        fmt: the submission's run-length form.

    Returns:
        Dice per ImageId, in the label file's order (1.0 where the truth and the prediction are both empty).

    Raises:
        DataError: a labelled image without a row in the submission, or a row that does not decode.
    """
    rows, problems = read_submission(path)
    if problems:
        raise DataError(f"cannot score {path}:\n{format_problems(problems)}")
    predicted = {row.image_id: row for row in rows}
    truth = lb.read_labels(labels_csv)
    unscored = [image_id for image_id in truth if image_id not in predicted]
    if unscored:
        raise DataError(
            f"{path} has no row for {len(unscored)} of the {len(truth)} images of {labels_csv}, e.g. "
            f"{unscored[:3]}; it was made for another test set"
        )
    sizes = sizes or {}
    counts = np.zeros((len(truth), 3), np.int64)
    for k, (image_id, labels) in enumerate(truth.items()):
        height, width = sizes.get(image_id, DEFAULT_SIZE)
        true = labels.mask(height, width)
        row = predicted[image_id]
        try:
            pred = rle.decode(row.encoded, height, width, fmt)
        except rle.RLEError as exc:
            raise DataError(f"{path}, line {row.line}, ImageId {image_id}: {exc}") from None
        counts[k] = np.count_nonzero(pred & true), np.count_nonzero(pred), np.count_nonzero(true)
    return pd.Series(dice_from_counts(counts[:, 0], counts[:, 1], counts[:, 2]), index=list(truth), name="dice")


def score_submission(
    path: str | os.PathLike, labels_csv: str | os.PathLike, sizes: Sizes | None = None, fmt: str = "relative"
) -> float:
    """The challenge score of a submission: the mean of :func:`dice_by_image` over the labelled images."""
    return float(dice_by_image(path, labels_csv, sizes, fmt).mean())
