"""The challenge metric: mean over images of Dice = 2|X and Y| / (|X| + |Y|), with Dice = 1 when both are empty.

Computed from per-image counts, so the same formula serves boolean masks here and the histogram-based threshold
search, which knows the counts without ever building the masks.
"""

from __future__ import annotations

import numpy as np


def dice_from_counts(intersection, pred_area, true_area) -> np.ndarray:
    """Per-image Dice from pixel counts (arrays of equal shape); 1.0 where both areas are 0."""
    intersection = np.asarray(intersection, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 2.0 * intersection / np.maximum(total, 1), 1.0)


def _as_batch(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"masks must be H x W or N x H x W, got shape {mask.shape}")
    return mask.astype(bool, copy=False).reshape(mask.shape[0], -1)


def dice_per_image(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Dice of each image of two boolean stacks (N x H x W, or one H x W image); 1.0 where both are empty."""
    pred, true = _as_batch(pred), _as_batch(true)
    if pred.shape != true.shape:
        raise ValueError(f"prediction and truth differ in shape: {pred.shape} vs {true.shape}")
    return dice_from_counts((pred & true).sum(1), pred.sum(1), true.sum(1))


def competition_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """The challenge score: the mean of :func:`dice_per_image` over the images.

    Args:
        pred: predicted masks, boolean N x H x W (or H x W for one image).
        true: ground-truth masks of the same shape.
    """
    return float(dice_per_image(pred, true).mean())
