"""What both reports draw with: figures saved atomically, mask outlines on X-rays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure

from pneumoseg.io import atomic_path


def save_figure(fig: Figure, path: Path, dpi: int) -> Path:
    """Save a matplotlib figure as PNG, atomically (a crash leaves no half-written plot).

    Args:
        fig: the figure.
        path: the PNG to write.
        dpi: its resolution in dots per inch.

    Returns:
        ``path``.
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path


def draw_outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], thickness: int) -> np.ndarray:
    """Draw the outer outline of every region of ``mask`` onto ``image``, in place.

    Args:
        image: an RGB uint8 H x W x 3 image.
        mask: a mask of the same H x W, non-zero inside; any integer or bool type.
        colour: the outline's RGB colour.
        thickness: the outline's width in pixels.

    Returns:
        ``image``.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, colour, thickness)
    return image
