"""Image resizing shared by every path that feeds a model: stage 01's PNGs and the server's requests go
through the same function, so a DICOM sent to the endpoint reaches the network as the same pixels that the
training and submission stages saw."""
from __future__ import annotations

import cv2
import numpy as np

from pneumoseg.errors import ConfigError

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
    "lanczos": cv2.INTER_LANCZOS4,
}


def interpolation_flag(name: str) -> int:
    """The OpenCV flag of an interpolation name in :data:`INTERPOLATIONS`."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown interpolation {name!r}; use one of {', '.join(INTERPOLATIONS)}") from None


def resize_square(pixels: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Resize an 8-bit grey image to ``size`` x ``size`` (unchanged when it already is).

    Args:
        pixels: H x W uint8 image.
        size: side of the output in pixels.
        interpolation: a name in :data:`INTERPOLATIONS` (``prepare.interpolation`` in the config).
    """
    if pixels.shape == (size, size):
        return pixels
    return cv2.resize(pixels, (size, size), interpolation=interpolation_flag(interpolation))
