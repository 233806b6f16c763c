"""The files of one prediction of the ``predict`` command (see :mod:`pneumoseg.inference.folder`): its mask, its
overlay, its DICOM SEG (for a DICOM) and its probability map, each written atomically. Nothing here imports torch:
the command's worker processes run it beside the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoseg.errors import DataError
from pneumoseg.inference.dicom_seg import write_segmentation
from pneumoseg.inference.sources import SourceImage
from pneumoseg.io import write_jpeg, write_png
from pneumoseg.reports.review import overlay

MASKS, OVERLAYS, SEGS, PROBABILITIES = "masks", "overlays", "seg", "probabilities"


def overlay_name(source: str) -> str:
    """The overlay of the image at ``source``, relative to the output folder: a JPEG, since it is a picture to look
    at (the masks are the exact output), and a tenth of a PNG's bytes and encoding time."""
    return f"{OVERLAYS}/{source}.jpg"


def write_outputs(
    image: SourceImage,
    probs: np.ndarray,
    mask: np.ndarray,
    output_dir: Path,
    probabilities: bool,
    model_name: str,
    model_version: str,
) -> str:
    """Write one prediction's files; return a note on what could not be written ("" when all was).

    Args:
        image: the image read (its pixels, and a DICOM's header).
        probs: the float32 probabilities at the image's size.
        mask: the bool mask after post-processing, at the image's size.
        output_dir: the command's output folder; the files go to ``masks/``, ``overlays/``, ``seg/`` and
            ``probabilities/``, named by the image's path under the input folder.
        probabilities: write the probability map (a 16-bit PNG, value / 65535) too.
        model_name, model_version: the model, recorded in the DICOM SEG.
    """
    assert image.pixels is not None  # only decoded images are predicted
    write_png(output_dir / MASKS / f"{image.source}.png", mask.astype(np.uint8) * 255)
    write_jpeg(
        output_dir / overlay_name(image.source),
        overlay(image.pixels, probs, mask, caption(image, probs, mask), bool(mask.any())),
    )
    if probabilities:
        write_png(
            output_dir / PROBABILITIES / f"{image.source}.png", np.round(np.clip(probs, 0, 1) * 65535).astype(np.uint16)
        )
    if image.header is None:
        return ""
    try:
        write_segmentation(output_dir / SEGS / f"{image.source}.seg.dcm", image.header, mask, model_name, model_version)
    except DataError as exc:
        return f"no DICOM SEG: {exc}"
    return ""


def caption(image: SourceImage, probs: np.ndarray, mask: np.ndarray) -> str:
    """The overlay's caption: the verdict, the image-level probability and, for a positive, the area."""
    area = int(np.count_nonzero(mask))
    text = f"{'PNEUMOTHORAX' if area else 'no pneumothorax'}  p={float(probs.max()):.2f}"
    if not area:
        return text
    mm2 = area_mm2(image, area)
    return text + (f", {float(mm2) / 100:.1f} cm2" if mm2 else f", {area} px")


def area_mm2(image: SourceImage, area: int) -> str:
    """``area`` pixels of ``image`` in mm2, to 0.1 ("" without a pixel spacing)."""
    return "" if image.pixel_area_mm2 is None else f"{area * image.pixel_area_mm2:.1f}"
