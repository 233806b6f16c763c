"""Training labels: the challenge's run-length CSV files, read into per-image instances and masks, and the
cross-validation folds balanced on them.

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

import cv2
import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pneumoseg.data import rle
from pneumoseg.errors import ConfigError, DataError

ID_COLUMN = "ImageId"
RLE_COLUMN = "EncodedPixels"
LINE_COLUMN = "line"

# Searched for in this order by "auto"; the stage-2 files first because stage 2 relabelled the stage-1
# test images too, so when both are present the stage-2 file is the complete one.
TRAIN_LABEL_FILES = ("stage_2_train.csv", "train-rle.csv")
SAMPLE_SUBMISSION_FILES = ("stage_2_sample_submission.csv", "sample_submission.csv")
AUTO = "auto"


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
            raise DataError(f"{path}, line {reader.line_num}: expected {n_fields} fields with an ImageId "
                            f"(ImageId,EncodedPixels), got {fields!r}")
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


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask at ``size x size`` pixels as uint8 0/255, the way it is stored for training.

    Each output pixel takes the share of the original pixels it covers (OpenCV's INTER_AREA) and is set
    when that share is at least one half, so the resized mask keeps the lesion's area and outline as well
    as a binary mask can. A lesion smaller than about half an output pixel vanishes; ``labels.csv`` keeps
    every image's original area, so such cases stay visible.

    Args:
        mask: HxW boolean (or 0/1) mask at the image's original size.
        size: the side of the square output.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (size, size):
        return mask.astype(np.uint8) * 255
    if not mask.any():
        return np.zeros((size, size), dtype=np.uint8)
    share = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return np.where(share >= 0.5, 255, 0).astype(np.uint8)


def locate_input_file(setting: str | None, input_dir: str | os.PathLike,
                      candidates: tuple[str, ...]) -> Path | None:
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
        raise DataError(f"file not found: {setting} (looked in {input_dir} and from {Path.cwd()}); "
                        f"fix the path in the config, or set it to {AUTO}")
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


# ---------------------------------------------------------------------------------------------------------
# Cross-validation folds, balanced on the mask area

EMPTY_BIN = 0


def check_area_edges(edges) -> list[int]:
    """``folds.area_bins`` as a list of ints: 0 first (the empty bin), then increasing.

    Raises:
        ConfigError: anything else.
    """
    edges = [int(edge) for edge in edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"folds.area_bins must start with 0 and increase, e.g. [0, 2000, 6500, 20000]; "
                          f"got {edges}")
    return edges


def area_bins(areas, edges) -> np.ndarray:
    """The area bin of each mask area: 0 for an empty mask, ``i`` for an area in ``(edges[i-1], edges[i]]``
    and ``len(edges)`` above the last edge.

    Args:
        areas: mask areas in original pixels.
        edges: :func:`check_area_edges` output.
    """
    return np.searchsorted(np.asarray(edges), np.asarray(areas), side="left")


def bin_names(edges) -> list[str]:
    """Readable names of the bins of :func:`area_bins`: ``empty``, ``1-2000``, ..., ``>20000``."""
    names = ["empty"]
    names += [f"{low + 1}-{high}" for low, high in zip(edges, edges[1:])]
    return names + [f">{edges[-1]}"]


def assign_folds(image_ids, areas, n_splits: int, seed: int, edges, groups=None) -> pd.DataFrame:
    """Split the training images into ``n_splits`` folds with about the same mix of mask areas.

    Without ``groups`` this is scikit-learn's StratifiedKFold on the area bin (empty being a bin of its own);
    with ``groups`` it is StratifiedGroupKFold, which keeps each group (a patient, say) inside one fold.
    Bins too small to reach every fold are pooled with their neighbour for the split (the ``area_bin``
    column still says each image's own bin).

    Args:
        image_ids: the training ImageIds.
        areas: each image's mask area in original pixels (0 for no pneumothorax).
        n_splits: the number of folds, at least 2.
        seed: shuffling seed; the same inputs and seed give the same folds.
        edges: ``folds.area_bins`` (see :func:`check_area_edges`).
        groups: optional group label of each image; a missing label (NaN or "") is a group of its own.

    Returns:
        A frame with columns ImageId, fold (0 .. n_splits-1), has_mask, area_bin, and group when ``groups``
        is given, in the order of ``image_ids``.

    Raises:
        ConfigError: ``n_splits`` below 2 or above the number of images (or groups), or no area bin with at
            least ``n_splits`` images.
    """
    frame = pd.DataFrame({ID_COLUMN: list(image_ids), "area": np.asarray(areas, dtype=np.int64)})
    frame["has_mask"] = frame["area"] > 0
    frame["area_bin"] = area_bins(frame["area"], check_area_edges(edges))
    n_units = len(frame)
    if groups is not None:
        group = pd.Series(list(groups), dtype=object)
        missing = group.isna() | (group.astype(str).str.strip() == "")
        frame["group"] = group.where(~missing, frame[ID_COLUMN]).astype(str).to_numpy()
        n_units = frame["group"].nunique()
    if not 2 <= n_splits <= n_units:
        what = "groups" if groups is not None else "training images"
        raise ConfigError(f"folds.n_splits={n_splits} must be at least 2 and at most the {n_units} {what}")
    strata = _pool_rare_bins(frame["area_bin"].to_numpy(), n_splits)
    largest = int(np.bincount(strata).max())
    if largest < n_splits:
        raise ConfigError(f"folds.n_splits={n_splits}: too few images to stratify (the largest area bin has "
                          f"{largest}); use fewer folds")
    if groups is None:
        splits = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(frame, strata)
    else:
        splits = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(frame, strata,
                                                                                     frame["group"])
    fold = np.empty(len(frame), dtype=np.int64)
    for index, (_, held_out) in enumerate(splits):
        fold[held_out] = index
    frame.insert(1, "fold", fold)
    return frame.drop(columns="area")


def _pool_rare_bins(bins: np.ndarray, min_count: int) -> np.ndarray:
    """Merge each non-empty bin with fewer than ``min_count`` images into the next smaller non-empty bin
    (the smallest into the next larger), so that every stratum can reach every fold."""
    strata = bins.copy()
    levels = sorted(set(strata[strata != EMPTY_BIN].tolist()))
    for lower, upper in zip(reversed(levels[:-1]), reversed(levels[1:])):
        if np.count_nonzero(strata == upper) < min_count:
            strata[strata == upper] = lower
    levels = sorted(set(strata[strata != EMPTY_BIN].tolist()))
    if len(levels) > 1 and np.count_nonzero(strata == levels[0]) < min_count:
        strata[strata == levels[0]] = levels[1]
    return strata


def fold_balance(folds: pd.DataFrame, areas, edges) -> pd.DataFrame:
    """Per fold (and over all): images, positives, positive rate, median positive area, images per area bin.

    Args:
        folds: the frame of :func:`assign_folds`.
        areas: the mask area of each row of ``folds``.
        edges: ``folds.area_bins``.
    """
    frame = folds.assign(area=np.asarray(areas))
    names = bin_names(edges)
    rows = []
    for fold, part in [*frame.groupby("fold", sort=True), ("all", frame)]:
        positive = part[part["has_mask"]]
        counts = part["area_bin"].value_counts()
        rows.append({
            "fold": fold,
            "images": len(part),
            "positive": len(positive),
            "positive_rate": round(len(positive) / max(len(part), 1), 3),
            "median_area": int(positive["area"].median()) if len(positive) else 0,
            **{name: int(counts.get(index, 0)) for index, name in enumerate(names)},
        })
    return pd.DataFrame(rows)
