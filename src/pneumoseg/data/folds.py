"""Cross-validation folds stratified on the pneumothorax area (scikit-learn's StratifiedKFold, or
StratifiedGroupKFold to keep every patient's images in one fold), and the per-fold balance report."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pneumoseg.data.labels import ID_COLUMN
from pneumoseg.errors import ConfigError


def check_area_edges(edges) -> list[int]:
    """``folds.area_bins`` as a list of ints: 0 first (the empty bin), then increasing.

    Raises:
        ConfigError: anything else.
    """
    edges = [int(edge) for edge in edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"folds.area_bins must start with 0 and increase, e.g. [0, 2000, 6500, 20000]; got {edges}")
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
        raise ConfigError(
            f"folds.n_splits={n_splits}: too few images to stratify (the largest area bin has "
            f"{largest}); use fewer folds"
        )
    if groups is None:
        splits = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(frame, strata)
    else:
        splits = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(frame, strata, frame["group"])
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
        rows.append(
            {
                "fold": fold,
                "images": len(part),
                "positive": len(positive),
                "positive_rate": round(len(positive) / max(len(part), 1), 3),
                "median_area": int(positive["area"].median()) if len(positive) else 0,
                **{name: int(counts.get(index, 0)) for index, name in enumerate(names)},
            }
        )
    return pd.DataFrame(rows)


EMPTY_BIN = 0
