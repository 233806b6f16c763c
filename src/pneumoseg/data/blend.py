"""The one blend of an ensemble's members: per image, each member's probability map brought to the image's original
size (:func:`pneumoseg.data.resize.resize_probabilities`, as stage 05 brings a map back), then their weighted mean.

Stage 04 blends the members' OOF maps this way (:class:`pneumoseg.postprocess.images.BlendedImages`), stage 05
and the server their test maps (:class:`pneumoseg.inference.predictor.EnsemblePredictor`), so the post-processing
searched on the blend is applied to the same blend. :func:`weighted_mean` blends any per-image values of the
members the same way (a per-image probability as well as a map).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pneumoseg.data.resize import resize_probabilities
from pneumoseg.errors import ConfigError


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    """The weights scaled to sum to 1, as float32 (the maps' type).

    Args:
        weights: one positive, finite weight per member.

    Raises:
        ConfigError: no weights, or one that is not a positive finite number.
    """
    values = np.asarray(list(weights), dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ConfigError(f"ensemble weights must be positive numbers, got {list(weights)}")
    return (values / values.sum()).astype(np.float32)


def weighted_mean(values: Sequence[np.ndarray | float], weights: Sequence[float]) -> np.ndarray:
    """The members' values of one image, averaged with ``weights`` (float32).

    Args:
        values: one array per member, all of one shape (maps at one size, or per-image probabilities).
        weights: one per member; scaled to sum to 1 (:func:`normalized_weights`).

    Raises:
        ValueError: as many values as weights there are not, or values of different shapes.
    """
    scaled = normalized_weights(weights)
    if len(values) != len(scaled):
        raise ValueError(f"{len(values)} members' values for {len(scaled)} weights")
    arrays = [np.asarray(value, dtype=np.float32) for value in values]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"the members' values differ in shape: {[a.shape for a in arrays]}")
    total = np.zeros(arrays[0].shape, np.float32)
    for weight, array in zip(scaled, arrays):
        total += weight * array
    return total


def blend_maps(maps: Sequence[np.ndarray], weights: Sequence[float], rows: int, cols: int) -> np.ndarray:
    """One image's blend: the weighted mean of each member's float32 probability map (any size) brought to
    ``rows`` x ``cols`` with :func:`pneumoseg.data.resize.resize_probabilities`.

    Resizing is linear (bilinear or area weights), so the maps of one size are averaged at that size first and
    resized once: the same blend as resizing every map (to float32 rounding, about 1e-7), at the cost of one
    resize per member size instead of one per member and one full-size sum instead of several.

    Args:
        maps: each member's map of the image, float32 in [0, 1], each at its member's size.
        weights: one per member; scaled to sum to 1 (:func:`normalized_weights`).
        rows, cols: the image's original size.

    Raises:
        ValueError: as many maps as weights there are not.
    """
    scaled = normalized_weights(weights)
    if len(maps) != len(scaled):
        raise ValueError(f"{len(maps)} members' maps for {len(scaled)} weights")
    by_size: dict[tuple[int, ...], np.ndarray] = {}
    for weight, probs in zip(scaled, maps):
        term = weight * np.asarray(probs, dtype=np.float32)  # a new array: the inputs are never written
        if term.shape in by_size:
            by_size[term.shape] += term
        else:
            by_size[term.shape] = term
    parts = [resize_probabilities(part, int(rows), int(cols)) for part in by_size.values()]
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def blend_gates(per_member: Sequence[np.ndarray | None], weights: Sequence[float]) -> np.ndarray | None:
    """The members' per-image gate probabilities blended: the weighted mean over the members that have a gate
    head (their weights scaled to sum to 1 among them), None when no member has one.

    Args:
        per_member: each member's gate probabilities of the same images (float32 N), or None without a head.
        weights: one per member.
    """
    kept = [(gates, weight) for gates, weight in zip(per_member, weights) if gates is not None]
    if not kept:
        return None
    return weighted_mean([gates for gates, _ in kept], [weight for _, weight in kept])
