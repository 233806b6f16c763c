"""PNG and JPEG X-rays as 8-bit grey images: the one decoder of the server's image bodies and of the ``predict``
command's files (light: no torch, so that decoding worker processes start fast and small)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pneumoseg.data.codestream import check_scans, jpeg_header
from pneumoseg.data.dicom import MAX_SIDE
from pneumoseg.errors import DataError

MAX_PIXELS = MAX_SIDE * MAX_SIDE
"""Largest image accepted, in pixels, whatever its format: the DICOM reader's bound (well above any radiograph,
far below what would exhaust memory)."""
# Pillow modes that are 8-bit grey or colour (with or without alpha, or a palette of such colours).
PICTURE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def check_size(height: int, width: int) -> None:
    """Refuse an empty image or one of more than :data:`MAX_PIXELS` pixels, before it is decoded.

    Raises:
        DataError: says which.
    """
    if height < 1 or width < 1:
        raise DataError(f"the image is empty ({height} x {width} pixels)")
    if height * width > MAX_PIXELS:
        raise DataError(
            f"the image has {height} x {width} pixels, more than the {MAX_PIXELS} accepted; downscale it first"
        )


def decode_picture(data: bytes, fmt: str) -> np.ndarray:
    """The uint8 H x W grey image of a PNG or JPEG file's bytes; colour is made grey with the ITU-R 601 luma weights.

    Args:
        data: the file's bytes.
        fmt: ``PNG`` or ``JPEG``: the only format accepted (Pillow raises on a truncated file, where OpenCV would
            pad it).

    Raises:
        DataError: too large, empty, a JPEG of more scans than the codestream reader allows, or of a mode other
            than 8-bit grey or colour.
        Exception: whatever Pillow raises on bytes that are not a readable image of ``fmt``.
    """
    if fmt == "JPEG":  # a progressive JPEG of thousands of scans takes seconds per megabyte: count them first
        check_scans(jpeg_header(data), "the JPEG")
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        check_size(image.height, image.width)
        if image.mode not in PICTURE_MODES:
            raise DataError(f"the {fmt} image has mode {image.mode!r}; send 8-bit grey or RGB (or DICOM for more bits)")
        image.load()
        grey = image if image.mode == "L" else image.convert("L")
        return np.array(grey)
