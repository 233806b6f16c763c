"""The images of a folder for the ``predict`` command: found recursively, read one by one (in worker processes),
and checked to be within what the model was trained for.

DICOM files (``.dcm``, ``.dicom``) are read by :func:`pneumoseg.data.dicom.read_dicom`, the one DICOM reader, after
their header is checked for scope (:func:`scope_note`); PNG and JPEG files (``.png``, ``.jpg``, ``.jpeg``) by the
server's decoder (:func:`pneumoseg.data.pictures.decode_picture`: 8-bit grey, or colour made grey) and are taken
as frontal chest X-rays. Nothing here imports torch: the worker processes that run it start in a fraction of the
time and memory. Whatever cannot be read becomes a :class:`ReadFailure` naming the file and the reason.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pneumoseg.data.dicom import MAX_FILE_BYTES, read_dicom, read_dicom_header
from pneumoseg.data.pictures import decode_picture
from pneumoseg.errors import DataError

DICOM = "DICOM"

FORMATS = {".dcm": DICOM, ".dicom": DICOM, ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
"""The file suffixes read (in any case), and the format each is decoded as."""
CHEST_MODALITIES = ("CR", "DX", "DR")
"""Modalities of projection radiographs; any other is out of scope."""
CHEST_BODY_PARTS = ("CHEST", "THORAX")
"""BodyPartExamined values of a chest; another value (when present) is out of scope."""
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL")
"""ViewPosition values of a lateral view (DICOM's defined terms, and the spellings seen in the wild)."""


@dataclass
class SourceImage:
    """One image of the input folder, read.

    Attributes:
        source: its path relative to the input folder (``/``-separated); names its outputs.
        pixels: uint8 H x W grey (0 is black); None for an out-of-scope DICOM that is not to be predicted.
        shape: ``(rows, cols)`` of the image.
        sop_instance_uid, study_instance_uid: the DICOM's UIDs ("" for PNG and JPEG).
        pixel_area_mm2: the area of one pixel in mm2 from PixelSpacing, else ImagerPixelSpacing (None without).
        in_scope: a frontal chest radiograph, as far as the header tells (see :func:`scope_note`).
        note: why it is out of scope ("" when in scope).
        header: a DICOM's dataset without its pixel data, which its DICOM SEG references (None for others).
    """

    source: str
    pixels: np.ndarray | None
    shape: tuple[int, int]
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    pixel_area_mm2: float | None = None
    in_scope: bool = True
    note: str = ""
    header: Dataset | None = None


@dataclass
class ReadFailure:
    """A file that could not be read: its path relative to the input folder, and why."""

    source: str
    error: str


def find_images(root: Path) -> Iterator[str]:
    """The images under ``root``, recursively, as ``/``-separated relative paths in a stable (sorted) order.

    Hidden files and folders are skipped (the temporary files of interrupted writes start with a dot); links to
    folders are not followed, so a link cannot make the walk loop.

    Raises:
        DataError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise DataError(
            f"input folder {root} does not exist or is not a folder; give --input a folder of DICOM, PNG or JPEG files"
        )
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and Path(name).suffix.lower() in FORMATS:
                yield (Path(folder) / name).relative_to(root).as_posix()


def read_source(root: Path, source: str, include_out_of_scope: bool) -> SourceImage | ReadFailure:
    """Read one image; never raises (it runs in a worker process, and one bad file must not stop the run).

    Args:
        root: the input folder.
        source: the image's path relative to ``root``.
        include_out_of_scope: decode an out-of-scope DICOM too, so that it is predicted.
    """
    path = root / source
    try:
        if FORMATS[Path(source).suffix.lower()] == DICOM:
            return _read_dicom_source(path, source, include_out_of_scope)
        return _read_picture(path, source)
    except DataError as exc:
        return ReadFailure(source, str(exc))
    except Exception as exc:  # every decoder fails on bad bytes in its own way; each means an unreadable file
        return ReadFailure(source, f"cannot read {path}: {type(exc).__name__}: {exc}")


def _read_dicom_source(path: Path, source: str, include_out_of_scope: bool) -> SourceImage:
    """A DICOM: its header first (bounded and checked by the DICOM reader), the pixels only when predicted."""
    metadata = read_dicom_header(path)
    # The reader has checked the header (size, completeness); pydicom reads it again for the attributes the
    # scope, the areas and the DICOM SEG need.
    header = pydicom.dcmread(path, stop_before_pixels=True)
    note = scope_note(header)
    pixels = None
    if not note or include_out_of_scope:
        pixels, metadata = read_dicom(path)
    return SourceImage(
        source=source,
        pixels=pixels,
        shape=(int(metadata["rows"] or 0), int(metadata["cols"] or 0)),
        sop_instance_uid=str(header.get("SOPInstanceUID", "")).strip(),
        study_instance_uid=str(header.get("StudyInstanceUID", "")).strip(),
        pixel_area_mm2=pixel_area_mm2(header),
        in_scope=not note,
        note=note,
        header=header,
    )


def _read_picture(path: Path, source: str) -> SourceImage:
    """A PNG or JPEG, read within the DICOM reader's byte bound and decoded as the server decodes one."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"cannot read {path}: it is not a regular file (a device, FIFO or socket)")
    if info.st_size > MAX_FILE_BYTES:
        raise DataError(
            f"cannot read {path}: it has {info.st_size} bytes, more than the {MAX_FILE_BYTES} any radiograph needs"
        )
    fmt = FORMATS[path.suffix.lower()]
    try:
        pixels = decode_picture(path.read_bytes(), fmt)
    except DataError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # Pillow fails on bad bytes in its own ways; each means an unreadable file
        raise DataError(f"cannot read {path}: not a readable {fmt} ({type(exc).__name__}: {exc})") from None
    return SourceImage(source=source, pixels=pixels, shape=pixels.shape)


def scope_note(header: Dataset) -> str:
    """Why a DICOM is outside what the model was trained for ("" when it is a frontal chest radiograph): a
    Modality other than CR, DX or DR; a BodyPartExamined that is present and not a chest; a lateral ViewPosition."""
    modality = str(header.get("Modality", "")).strip().upper()
    body_part = str(header.get("BodyPartExamined", "")).strip().upper()
    view = str(header.get("ViewPosition", "")).strip().upper()
    reasons = []
    if modality not in CHEST_MODALITIES:
        reasons.append(f"modality {modality or 'missing'} (not {'/'.join(CHEST_MODALITIES)})")
    if body_part and body_part not in CHEST_BODY_PARTS:
        reasons.append(f"body part {body_part} (not a chest)")
    if view in LATERAL_VIEWS:
        reasons.append(f"lateral view ({view})")
    return "; ".join(reasons)


def pixel_area_mm2(header: Dataset) -> float | None:
    """The area of one pixel in mm2: the product of PixelSpacing's two values (row and column spacing), else of
    ImagerPixelSpacing's; None when neither holds two positive numbers."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            rows, cols = (float(value) for value in header.get(keyword) or ())
        except (TypeError, ValueError):
            continue
        if rows > 0 and cols > 0 and np.isfinite(rows * cols):
            return rows * cols
    return None
