"""Every resize of the pipeline: images, masks and probability maps, at one place so that each kind follows one
rule wherever it is resized.

* images (:func:`resize_square`): stage 01's PNGs and every image fed to a model (the server's requests too), so a
  DICOM sent to the endpoint reaches the network as the same pixels that training and stage 05 saw;
* masks (:func:`resize_mask`): stage 02's training masks and the truth the search compares against;
* probability maps (:func:`resize_probabilities`): OOF maps to their stored size, and every map brought back to
  its image's size in stage 05 and the server;
* anything else (:func:`resize`): thumbnails in the reports, the demo's synthetic fields.
"""

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


def resize(array: np.ndarray, rows: int, cols: int, interpolation: str) -> np.ndarray:
    """``array`` (H x W, or H x W x C) resized to ``rows`` x ``cols`` (unchanged when it already is).

    Args:
        array: the image or map; its dtype is kept.
        rows, cols: the output's height and width.
        interpolation: a name in :data:`INTERPOLATIONS`.
    """
    if array.shape[:2] == (rows, cols):
        return array
    return cv2.resize(array, (cols, rows), interpolation=interpolation_flag(interpolation))


def resize_square(pixels: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Resize an 8-bit grey image to ``size`` x ``size``.

    Args:
        pixels: H x W uint8 image.
        size: side of the output in pixels.
        interpolation: a name in :data:`INTERPOLATIONS` (``prepare.interpolation`` in the config).
    """
    return resize(pixels, size, size, interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask at ``size x size`` pixels as uint8 0/255, the way it is stored for training.

    Each output pixel takes the share of the original pixels it covers (area averaging) and is set when that share
    is at least one half, so the resized mask keeps the lesion's area and outline as well as a binary mask can. A
    lesion smaller than about half an output pixel vanishes; ``labels.csv`` keeps every image's original area, so
    such cases stay visible.

    Args:
        mask: H x W boolean (or 0/1, or 0/255) mask at the image's original size.
        size: the side of the square output.
    """
    mask = np.asarray(mask) > 0
    if mask.shape == (size, size):
        return mask.astype(np.uint8) * 255
    if not mask.any():
        return np.zeros((size, size), dtype=np.uint8)
    share = resize(mask.astype(np.float32), size, size, "area")
    return np.where(share >= 0.5, 255, 0).astype(np.uint8)


def resize_probabilities(maps: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Probability maps resized to ``rows`` x ``cols``: bilinear where they grow, area averaging where they shrink
    (where one side grows and the other shrinks, bilinear).

    Args:
        maps: one H x W map, or N x H x W maps, float32 in [0, 1].
        rows, cols: the output's height and width.
    """
    height, width = maps.shape[-2:]
    if (height, width) == (rows, cols):
        return maps
    interpolation = "area" if rows <= height and cols <= width else "linear"
    if maps.ndim == 2:
        return resize(maps, rows, cols, interpolation)
    return np.stack([resize(m, rows, cols, interpolation) for m in maps])
