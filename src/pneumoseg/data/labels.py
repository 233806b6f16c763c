"""Training labels: the challenge's run-length CSV files, read into per-image instances and masks.

Three forms of the same two-column file (``ImageId``, ``EncodedPixels``) exist, and all of them read:

* stage 1 ``train-rle.csv``: header ``ImageId, EncodedPixels`` and every value with a leading space;
* stage 2 ``stage_2_train.csv`` and the sample submissions: header ``ImageId,EncodedPixels``, no spaces;
* the sample-image labels ``train-rle-sample.csv``: UTF-8 BOM, CRLF line ends and no header row.

Column names and values are stripped, a first row with a cell ``ImageId`` (in any case) is the header, and a
file without one is taken to be ``ImageId, EncodedPixels`` in that order. An image has one row per
pneumothorax instance (``-1`` for none); its rows need not be adjacent, and its mask is the union of its
instances, which may overlap. Rows are numbered by their line in the file, so that an error message points
at the line to fix.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pneumoseg.data import rle
from pneumoseg.errors import DataError

ID_COLUMN = "ImageId"
RLE_COLUMN = "EncodedPixels"
LINE_COLUMN = "line"


@dataclass(frozen=True)
class ImageLabels:
    """The label rows of one image.

    Args:
        image_id: the image's ImageId (its DICOM's SOPInstanceUID).
        source: the label file the rows came from (for error messages).
        rles: the run-length string of each instance, in file order; ``-1`` rows are not instances.
        lines: the file line of each entry of ``rles``.
        n_rows: every row of this image in the file, ``-1`` rows included.
        first_line: the file line of the image's first row.
    """

    image_id: str
    source: Path
    rles: tuple[str, ...]
    lines: tuple[int, ...]
    n_rows: int
    first_line: int

    @property
    def n_instances(self) -> int:
        return len(self.rles)

    @property
    def has_mask(self) -> bool:
        return bool(self.rles)

    def instance_masks(self, height: int, width: int) -> list[np.ndarray]:
        """One boolean ``height x width`` mask per instance (an empty list for an image without any).

        Raises:
            RLEError: a malformed row; the message names the file, the line and the ImageId.
        """
        return [self._decode(text, line, height, width) for text, line in zip(self.rles, self.lines)]

    def mask(self, height: int, width: int) -> np.ndarray:
        """The union (OR) of the instances as a boolean ``height x width`` mask, at the image's original size.

        Raises:
            RLEError: as :meth:`instance_masks`.
        """
        union = np.zeros((height, width), dtype=bool)
        for text, line in zip(self.rles, self.lines):
            union |= self._decode(text, line, height, width)
        return union

    def _decode(self, text: str, line: int, height: int, width: int) -> np.ndarray:
        try:
            return rle.decode(text, height, width)
        except rle.RLEError as exc:
            raise rle.RLEError(
                f"{self.source}, line {line}, ImageId {self.image_id}: {exc}. Fix or remove that row."
            ) from None


def read_rle_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read any of the challenge's run-length CSV forms (see the module docstring).

    Args:
        path: the CSV file.

    Returns:
        A frame with columns ``ImageId``, ``EncodedPixels`` (stripped strings) and ``line`` (the row's
        1-based line in the file), in file order.

    Raises:
        DataError: the file is missing or empty, its header lacks a column, or a row is not two fields
            with an ImageId.
    """
    path = Path(path)
    try:
        # utf-8-sig drops a BOM; newline="" lets the csv module take CRLF and LF alike.
        with open(path, encoding="utf-8-sig", newline="") as handle:
            records = _read_records(path, csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read label file {path}: {exc}") from None
    if not records:
        raise DataError(f"label file {path} has no rows; expected lines of ImageId,EncodedPixels")
    return pd.DataFrame(records, columns=[ID_COLUMN, RLE_COLUMN, LINE_COLUMN])


def _read_records(path: Path, reader) -> list[tuple[str, str, int]]:
    id_index, rle_index, n_fields = 0, 1, 2
    records = []
    first_row = True
    for fields in reader:
        fields = [field.strip() for field in fields]
        if not any(fields):
            continue
        if first_row and ID_COLUMN.lower() in (field.lower() for field in fields):
            id_index, rle_index = _header_columns(path, fields)
            n_fields = len(fields)
            first_row = False
            continue
        first_row = False
        if len(fields) != n_fields or not fields[id_index]:
            raise DataError(
                f"{path}, line {reader.line_num}: expected {n_fields} fields with an ImageId "
                f"(ImageId,EncodedPixels), got {fields!r}"
            )
        records.append((fields[id_index], fields[rle_index], reader.line_num))
    return records


def _header_columns(path: Path, names: list[str]) -> tuple[int, int]:
    lowered = [name.lower() for name in names]
    missing = [name for name in (ID_COLUMN, RLE_COLUMN) if name.lower() not in lowered]
    if missing:
        raise DataError(f"label file {path}: header {names} lacks {', '.join(missing)}")
    return lowered.index(ID_COLUMN.lower()), lowered.index(RLE_COLUMN.lower())


def group_labels(rows: pd.DataFrame, source: str | os.PathLike) -> dict[str, ImageLabels]:
    """Group the rows of :func:`read_rle_csv` by ImageId, in order of each image's first row.

    Args:
        rows: the frame :func:`read_rle_csv` returns.
        source: the file the rows came from, for error messages.
    """
    instances: dict[str, list[tuple[str, int]]] = {}
    row_lines: dict[str, list[int]] = {}
    for image_id, text, line in rows[[ID_COLUMN, RLE_COLUMN, LINE_COLUMN]].itertuples(index=False):
        row_lines.setdefault(image_id, []).append(line)
        found = instances.setdefault(image_id, [])
        if text not in (rle.EMPTY, ""):
            found.append((text, line))
    return {
        image_id: ImageLabels(
            image_id=image_id,
            source=Path(source),
            rles=tuple(text for text, _ in found),
            lines=tuple(line for _, line in found),
            n_rows=len(row_lines[image_id]),
            first_line=row_lines[image_id][0],
        )
        for image_id, found in instances.items()
    }


def read_labels(path: str | os.PathLike) -> dict[str, ImageLabels]:
    """Read a training label file into ``{ImageId: ImageLabels}`` (see :func:`read_rle_csv`)."""
    return group_labels(read_rle_csv(path), path)


def read_image_ids(path: str | os.PathLike) -> list[str]:
    """The distinct ImageIds of a run-length CSV (a sample submission, say), in order of first appearance."""
    return list(dict.fromkeys(read_rle_csv(path)[ID_COLUMN]))
