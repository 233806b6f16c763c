"""Exact grid search of post-processing parameters on out-of-fold (OOF) predictions, scored as the submission is.

Stage 05 brings each test map back to its image's original size with
:func:`pneumoseg.data.resize.resize_probabilities` (bilinear) and post-processes it there with
:mod:`pneumoseg.postprocess.strategies`; the challenge scores that mask against the original-size truth. The search
scores every candidate the same way: each OOF map (uint8 levels, :mod:`pneumoseg.data.probstore`) is brought to
its image's original size with that function (:func:`to_original`) and compared with the truth decoded at that
size, never with a downsampled mask.

Exact without re-binarising: the candidates use few distinct thresholds (the grids' ``top`` and ``bottom``
values), so one pass counts, per image, the full-size pixels above each of them, overall and inside the truth
(:class:`ThresholdCounts`; float32 comparisons, as the strategies make them). These give the predicted area and
the intersection, hence the exact Dice, of every ``(top, min_area, bottom)`` point in O(1) per image; a grid's
per-fold sums are one matrix product (:func:`exact_sums`).

Dropping small connected components needs labelled components, so their minimum areas are searched in a second
pass, only around the best exact point of each grid (:func:`component_sums`): one labelling per image and
threshold gives the exact Dice of every area at once, and an image that the point declares empty is not labelled.

Gated candidates (the ``gated`` strategy around each grid's strategy, one per gate threshold of ``gate_thresholds``)
need no further pass: a gate only empties images, so an image's Dice under a gated candidate is the ungated
candidate's when its gate probability is >= the threshold, and the empty mask's (1 if the truth is empty, else 0)
otherwise. Each (grid, gate threshold) is searched as a grid of its own, its sums taken over the images the gate
keeps, and its component areas refined around its own best exact point.

The choice (best exact point, components around it, then the best candidate of all, gate thresholds included) is
rerun on the other folds for each held-out fold, component refinement included, so the nested estimate measures the
whole procedure (:class:`Nested`); with gates it is also given for the ungated and the gated candidates alone.

Both passes work image by image (one full-size map at a time per worker) and in parallel over blocks of images
(joblib processes), reading the images through an :class:`ImageSource`. :func:`evaluate` is the straightforward
method (apply each strategy to each full-size map and count): the reference of the tests and the benchmark, and
stage 04's independent check of its choice.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from pneumoseg.data.probstore import dequantize
from pneumoseg.data.resize import resize_probabilities
from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.postprocess.strategies import (
    OUTLINE,
    PIXELS,
    PostProcessor,
    check_component_rule,
    components,
    draw_outlines,
    outlines,
    scale_area,
)
from pneumoseg.registry import Registry

PARAM_COLUMNS = ("top", "min_area", "bottom", "min_component_area")
GATED = "gated"  # the strategy name of a gated candidate's block (pneumoseg.postprocess.strategies.Gated)
TIE = 1e-12
BLOCK_SIZE = 256


class ImageSource(Protocol):
    """The OOF images of a search. A part is sent to each worker process, so parts must pickle small (paths and
    label strings, or only their own maps)."""

    def __len__(self) -> int:
        """The number of images."""

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(levels, truth)`` of every image, in order: the uint8 OOF map (S x S), or float32 probabilities (an
        ensemble's blend, :mod:`pneumoseg.data.blend`), and the boolean truth at the image's original size (H x W)."""

    def part(self, start: int, stop: int) -> ImageSource:
        """Images ``start .. stop - 1`` as a source of their own."""


def to_original(levels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An OOF map (uint8 levels of a probability store, or float32 probabilities such as a blend) as float32
    probabilities at its image's original ``shape``, brought there as stage 05 and the server bring a test map
    back."""
    probs = dequantize(levels) if levels.dtype == np.uint8 else levels
    return resize_probabilities(probs, int(shape[0]), int(shape[1]))


def _map_blocks(function, source: ImageSource, n_jobs: int, block_size: int, *args) -> list:
    """``function(part, start, *args)`` for consecutive parts of ``block_size`` images (``start``: the part's
    first row), in order."""
    starts = range(0, len(source), block_size)
    with Parallel(n_jobs=n_jobs) as parallel:
        return parallel(
            delayed(function)(source.part(start, min(start + block_size, len(source))), start, *args)
            for start in starts
        )


@dataclass
class ThresholdCounts:
    """Per-image pixel counts above each threshold, at the images' original size.

    Attributes:
        thresholds: T distinct float32 thresholds, ascending.
        above: N x T; ``above[i, j]`` is the number of pixels of image ``i`` with p > ``thresholds[j]``.
        above_true: the same, counting only pixels inside the truth.
        true_area: N, the truth's pixels.
        area_scale: N, ``H * W / 1024**2`` of each image: an area of the 1024 px image times this is in pixels of
            the image (:func:`pneumoseg.postprocess.strategies.scale_area`).
    """

    thresholds: np.ndarray
    above: np.ndarray
    above_true: np.ndarray
    true_area: np.ndarray
    area_scale: np.ndarray

    def __len__(self) -> int:
        return len(self.above)

    def counts(self, thresholds: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image and threshold (N x len(thresholds)): pixels with p > t, and how many of them are true.

        Raises:
            KeyError: a threshold that was not counted.
        """
        wanted = np.asarray(thresholds, dtype=np.float32)
        missing = wanted[~np.isin(wanted, self.thresholds)]
        if missing.size:
            raise KeyError(f"thresholds {sorted(set(missing.tolist()))} were not counted")
        columns = np.searchsorted(self.thresholds, wanted)
        return self.above[:, columns], self.above_true[:, columns]

    def area_limits(self, min_areas: Sequence[float] | np.ndarray) -> np.ndarray:
        """N x len(min_areas): each area (pixels of the 1024 px image) in pixels of each image, as
        :func:`pneumoseg.postprocess.strategies.scale_area` computes it."""
        return np.asarray(min_areas, dtype=np.float64)[None, :] * self.area_scale[:, None]


def grid_thresholds(grids: Sequence[Grid]) -> np.ndarray:
    """The distinct thresholds (float32, ascending) that the candidates of ``grids`` compare with."""
    return np.unique(np.concatenate([np.concatenate([g.tops, g.bottoms]) for g in grids]).astype(np.float32))


def _above_counts(bins: np.ndarray, n_thresholds: int) -> np.ndarray:
    """From each pixel's number of thresholds below it, the pixels above each threshold."""
    per_bin = np.bincount(bins, minlength=n_thresholds + 1)
    return np.cumsum(per_bin[::-1])[::-1][1:]


def _count_block(part: ImageSource, start: int, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    n, n_thresholds = len(part), len(thresholds)
    above, above_true = np.zeros((n, n_thresholds), np.int64), np.zeros((n, n_thresholds), np.int64)
    true_area, area_scale = np.zeros(n, np.int64), np.zeros(n)
    for i, (levels, truth) in enumerate(part):
        full = to_original(levels, truth.shape)
        # Most pixels of an OOF map lie below every threshold: only those above the lowest are binned.
        low = full > thresholds[0]
        bins = np.searchsorted(thresholds, full[low], side="left")  # p > thresholds[j] exactly when j < bin
        above[i] = _above_counts(bins, n_thresholds)
        above_true[i] = _above_counts(bins[truth[low]], n_thresholds)
        true_area[i] = np.count_nonzero(truth)
        area_scale[i] = scale_area(1.0, truth.shape)
    return above, above_true, true_area, area_scale


def count_thresholds(
    source: ImageSource, thresholds: np.ndarray, n_jobs: int = 1, block_size: int = BLOCK_SIZE
) -> ThresholdCounts:
    """One pass over ``source`` -> :class:`ThresholdCounts` for ``thresholds`` (float32, ascending, distinct).

    Args:
        source: the images.
        thresholds: from :func:`grid_thresholds`.
        n_jobs: joblib worker processes (-1: every core).
        block_size: images per task.
    """
    if len(source) == 0:
        raise ValueError("no images to count")
    parts = _map_blocks(_count_block, source, n_jobs, block_size, np.asarray(thresholds, np.float32))
    return ThresholdCounts(np.asarray(thresholds, np.float32), *(np.concatenate(p) for p in zip(*parts)))


def _values(key: str, spec: Sequence[float], low: float, high: float) -> np.ndarray:
    """The sorted, distinct grid values of a config list, checked to lie in [low, high]."""
    values: np.ndarray
    try:
        values = np.unique(np.round(np.asarray(list(spec), dtype=np.float64), 6))
    except (TypeError, ValueError):
        values = np.empty(0)
    if values.size == 0 or values.min() < low or values.max() > high:
        raise ConfigError(f"search grid {key}: needs a list of values in [{low}, {high}], got {spec}")
    return values


def _probabilities(key: str, spec) -> np.ndarray:
    return _values(key, spec, 0.0, 1.0)


def _areas(key: str, spec) -> np.ndarray:
    return _values(key, spec, 0.0, np.inf)


def _component_areas(key: str, spec) -> np.ndarray:
    # An area of 0 filters nothing: the exact grid already holds it.
    values = _areas(key, spec or [0])
    return values[values > 0]


class Grid(ABC):
    """A strategy's search grid, written in the triplet's terms.

    Every candidate is a point ``(top, min_area, bottom)`` of the exact grid, or such a point with a
    ``min_component_area`` from :attr:`component_areas` (searched around the best exact point).
    """

    strategy: ClassVar[str]

    def __init__(
        self,
        tops: np.ndarray,
        min_areas: np.ndarray,
        bottoms: np.ndarray,
        component_areas: np.ndarray,
        component_rule: str = PIXELS,
    ) -> None:
        self.tops, self.min_areas, self.bottoms = tops, min_areas, bottoms
        self.component_areas = component_areas
        self.component_rule = component_rule

    @abstractmethod
    def valid(self) -> np.ndarray:
        """Boolean (len(tops) x len(bottoms)): which ``(top, bottom)`` pairs are candidates."""

    @abstractmethod
    def params(self, top: float, min_area: float, bottom: float, min_component_area: float) -> dict[str, float]:
        """The strategy's own parameters for a point of the grid."""

    @abstractmethod
    def neighbours(self, top: int, min_area: int, bottom: int, steps: int) -> list[tuple[int, int, int]]:
        """Indices ``(top, min_area, bottom)`` of the exact points whose components are searched, around the
        best exact point (given by its indices) and within ``steps`` grid steps of its ``bottom``."""

    def _near(self, index: int, steps: int) -> range:
        return range(max(index - steps, 0), min(index + steps + 1, len(self.bottoms)))


GRIDS: Registry[Grid] = Registry("search grid")


@GRIDS.register("threshold")
class ThresholdGrid(Grid):
    """Grid of the ``threshold`` strategy: the triplet with ``top = bottom = threshold`` and no image-level area.

    Args:
        threshold: the pixel thresholds.
        min_area: component areas (pixels of the 1024 px image) tried around the best threshold.
    """

    strategy = "threshold"

    def __init__(self, threshold, min_area=()) -> None:
        thresholds = _probabilities("threshold.threshold", threshold)
        super().__init__(thresholds, np.zeros(1), thresholds, _component_areas("threshold.min_area", min_area))

    def valid(self) -> np.ndarray:
        return np.eye(len(self.tops), dtype=bool)

    def params(self, top, min_area, bottom, min_component_area):
        return {"threshold": bottom, "min_area": min_component_area}

    def neighbours(self, top, min_area, bottom, steps):
        return [(i, 0, i) for i in self._near(bottom, steps)]


@GRIDS.register("triplet")
class TripletGrid(Grid):
    """Grid of the ``triplet`` strategy; pairs with ``bottom > top`` are left out.

    Args:
        top, min_area, bottom: the exact grid; areas in pixels of the 1024 px image.
        min_component_area: component areas tried around the best exact point.
        component_rule: how they are measured, ``pixels`` or ``outline``
            (:class:`pneumoseg.postprocess.strategies.Triplet`).
    """

    strategy = "triplet"

    def __init__(self, top, min_area, bottom, min_component_area=(), component_rule=PIXELS) -> None:
        check_component_rule("search grid triplet", component_rule)
        super().__init__(
            _probabilities("triplet.top", top),
            _areas("triplet.min_area", min_area),
            _probabilities("triplet.bottom", bottom),
            _component_areas("triplet.min_component_area", min_component_area),
            component_rule,
        )
        if not self.valid().any():
            raise ConfigError("search grid triplet: every bottom exceeds every top; no candidate is left")

    def valid(self) -> np.ndarray:
        return self.bottoms[None, :] <= self.tops[:, None]

    def params(self, top, min_area, bottom, min_component_area):
        rule = {} if self.component_rule == PIXELS else {"component_rule": self.component_rule}
        return {"top": top, "min_area": min_area, "bottom": bottom, "min_component_area": min_component_area, **rule}

    def neighbours(self, top, min_area, bottom, steps):
        return [(top, min_area, i) for i in self._near(bottom, steps) if self.valid()[top, i]]


def _group_sums(per_image: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum ``per_image`` (N x ...) over the images of each group -> G x ..."""
    out = np.zeros((n_groups, *per_image.shape[1:]))
    np.add.at(out, groups, per_image)
    return out


def exact_sums(
    counts: ThresholdCounts, groups: np.ndarray, n_groups: int, grid: Grid, passed: np.ndarray | None = None
) -> np.ndarray:
    """Summed Dice of every exact grid point, per group: G x len(tops) x len(min_areas) x len(bottoms).

    Args:
        counts: the images' threshold counts (covering the grid's thresholds).
        groups: the group (fold index, 0..G-1) of each image.
        n_groups: G.
        grid: the strategy's grid. Invalid points are NaN.
        passed: N booleans, the images a gate keeps (the others are predicted empty); None keeps every image.

    An image is empty when fewer than ``min_area`` of its pixels are above ``top``, else its mask is p > ``bottom``;
    so its Dice is ``empty`` (1 if the truth is empty, else 0) plus ``kept * (dice at bottom - empty)``, and the
    sum over images of a group is a product of the ``kept`` matrix with that gain.
    """
    kept = _kept_images(counts, grid, passed)
    pred, inter = counts.counts(grid.bottoms)
    empty = (counts.true_area == 0).astype(np.float64)
    gain = dice_from_counts(inter, pred, counts.true_area[:, None]) - empty[:, None]  # N x Tb
    n_points = len(grid.tops) * len(grid.min_areas)
    sums: np.ndarray = np.empty((n_groups, n_points, len(grid.bottoms)))
    for g in range(n_groups):
        rows = groups == g
        sums[g] = empty[rows].sum() + kept[rows].reshape(-1, n_points).T.astype(np.float64) @ gain[rows]
    sums = sums.reshape(n_groups, len(grid.tops), len(grid.min_areas), len(grid.bottoms))
    sums[:, ~grid.valid()[:, None, :].repeat(len(grid.min_areas), axis=1)] = np.nan
    return sums


def _outline_counts(mask: np.ndarray, truth: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted area and intersection of one mask under the outline rule, for each area limit (pixels of this
    image): :func:`pneumoseg.postprocess.strategies.remove_small_outlines`, each distinct set of kept outlines
    drawn once."""
    found, areas = outlines(mask)
    pred, inter = np.zeros(len(limits), np.int64), np.zeros(len(limits), np.int64)
    drawn: dict[bytes, tuple[int, int]] = {}
    for a, limit in enumerate(limits):
        kept = areas > limit
        if kept.tobytes() not in drawn:
            drawing = draw_outlines(mask.shape, [outline for outline, keep in zip(found, kept) if keep])
            drawn[kept.tobytes()] = (int(np.count_nonzero(drawing)), int(np.count_nonzero(drawing & truth)))
        pred[a], inter[a] = drawn[kept.tobytes()]
    return pred, inter


def _kept_images(counts: ThresholdCounts, grid: Grid, passed: np.ndarray | None) -> np.ndarray:
    """N x len(tops) x len(min_areas): the images each ``(top, min_area)`` test (and the gate ``passed``) keeps."""
    above_top, _ = counts.counts(grid.tops)
    kept = above_top[:, :, None] >= counts.area_limits(grid.min_areas)[:, None, :]
    if passed is not None:
        kept &= passed[:, None, None]
    return kept


def _class_rows(counts: ThresholdCounts, groups: np.ndarray, n_groups: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group: its positive and its empty images (boolean rows)."""
    positive = counts.true_area > 0
    return [((groups == g) & positive, (groups == g) & ~positive) for g in range(n_groups)]


def exact_detections(
    counts: ThresholdCounts, groups: np.ndarray, n_groups: int, grid: Grid, passed: np.ndarray | None = None
) -> np.ndarray:
    """How many positive and how many empty images of each group every exact grid point marks (non-empty mask):
    G x 2 x len(tops) x len(min_areas) x len(bottoms); arguments as for :func:`exact_sums`.

    An image is marked when its ``(top, min_area)`` test keeps it and it has a pixel above ``bottom``; the image-
    level sensitivity of a point is its positive count over the positive images, and so on.
    """
    kept = _kept_images(counts, grid, passed)
    marks = (counts.counts(grid.bottoms)[0] > 0).astype(np.float64)  # N x Tb
    n_points = len(grid.tops) * len(grid.min_areas)
    out = np.empty((n_groups, 2, n_points, len(grid.bottoms)))
    for g, classes in enumerate(_class_rows(counts, groups, n_groups)):
        for c, rows in enumerate(classes):
            out[g, c] = kept[rows].reshape(-1, n_points).T.astype(np.float64) @ marks[rows]
    return out.reshape(n_groups, 2, len(grid.tops), len(grid.min_areas), len(grid.bottoms))


def _component_counts(
    full: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, min_pixels: np.ndarray, rule: str = PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted area and intersection (len(thresholds) x len(min_pixels)) of one full-size map, for each
    threshold (ascending) and each minimum component size (pixels of this image), components measured by
    ``rule`` (``pixels``: connected components of at least that many pixels are kept; ``outline``: outlines whose
    polygon area is above it)."""
    pred = np.zeros((len(thresholds), len(min_pixels)), np.int64)
    inter = np.zeros_like(pred)
    lowest = full > thresholds[0]
    rows, cols = np.flatnonzero(lowest.any(1)), np.flatnonzero(lowest.any(0))
    if rows.size == 0:
        return pred, inter
    # Every mask of a higher threshold lies inside the lowest one's bounding box; labelling that box is cheaper.
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    full, truth = full[box], truth[box]
    for k, threshold in enumerate(thresholds):
        if rule == OUTLINE:
            pred[k], inter[k] = _outline_counts(full > threshold, truth, min_pixels)
            continue
        labels, areas = components(full > threshold)
        if areas.size == 0:
            break
        inside = np.bincount(labels[truth], minlength=areas.size + 1)[1:]
        keep = areas[None, :] >= min_pixels[:, None]  # A x components
        pred[k], inter[k] = keep @ areas, keep @ inside
    return pred, inter


def _component_block(
    part: ImageSource, start: int, thresholds: np.ndarray, needed: np.ndarray, component_areas: np.ndarray, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per image of the part, threshold and component area: predicted area and intersection; only the
    thresholds that ``needed`` (all N images x len(thresholds)) marks for an image are labelled. ``rule``: as in
    :func:`_component_counts`."""
    pred = np.zeros((len(part), len(thresholds), len(component_areas)), np.int64)
    inter = np.zeros_like(pred)
    for i, (levels, truth) in enumerate(part):
        cuts = np.flatnonzero(needed[start + i])
        if cuts.size:
            full = to_original(levels, truth.shape)
            pred[i, cuts], inter[i, cuts] = _component_counts(
                full, truth, thresholds[cuts], np.asarray(scale_area(component_areas, truth.shape)), rule
            )
    return pred, inter


def component_sums(
    source: ImageSource,
    counts: ThresholdCounts,
    groups: np.ndarray,
    n_groups: int,
    points: Sequence[tuple[float, float, float]],
    component_areas: np.ndarray,
    passes: np.ndarray | None = None,
    point_gates: Sequence[Collection[int]] | None = None,
    n_jobs: int = 1,
    block_size: int = BLOCK_SIZE,
    rule: str = PIXELS,
    detections: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Summed Dice per gate, group, ``(top, min_area, bottom)`` point and component area.

    Args:
        source: the images, in the order of ``counts``.
        counts: their threshold counts (they decide which images the ``top`` / ``min_area`` test keeps).
        groups, n_groups: as in :func:`exact_sums`.
        points: the exact points to refine.
        component_areas: minimum component areas, pixels of the 1024 px image.
        passes: N x V booleans, the images each of V gates keeps (the others are predicted empty); None: one
            gate keeping every image.
        point_gates: per point, the gates (columns of ``passes``) it is wanted behind; None: every gate. Only
            images that one of them keeps are labelled.
        n_jobs, block_size: as in :func:`count_thresholds`.
        rule: how components are measured, ``pixels`` or ``outline`` (:func:`_component_counts`).
        detections: also count the positive and the empty images each candidate marks (non-empty mask).

    Returns:
        V x G x len(points) x len(component_areas); NaN for a gate that ``point_gates`` does not give the point.
        With ``detections``, also V x G x 2 x len(points) x len(component_areas): the positive and the empty
        images marked (as :func:`exact_detections`).
    """
    tops, min_areas, bottoms = (np.array(v, dtype=np.float64) for v in zip(*points))
    above_top, _ = counts.counts(tops)
    kept = above_top >= counts.area_limits(min_areas)  # N x P
    passes = np.ones((len(counts), 1), bool) if passes is None else np.asarray(passes, bool)
    point_gates = [range(passes.shape[1])] * len(points) if point_gates is None else point_gates
    wanted = np.zeros((passes.shape[1], len(points)), bool)
    for p, gates in enumerate(point_gates):
        wanted[list(gates), p] = True
    # A point wanted behind strict gates only needs the images they keep labelled; the others score as empty.
    kept &= passes.astype(np.int32) @ wanted.astype(np.int32) > 0
    cuts, point_cut = np.unique(bottoms.astype(np.float32), return_inverse=True)
    needed = np.zeros((len(counts), len(cuts)), bool)
    for p, cut in enumerate(point_cut):
        needed[:, cut] |= kept[:, p]
    parts = _map_blocks(_component_block, source, n_jobs, block_size, cuts, needed, component_areas, rule)
    pred_cut, inter_cut = (np.concatenate(p) for p in zip(*parts))  # N x C x A
    if len(pred_cut) != len(counts):
        raise ValueError(f"the pass gave {len(pred_cut)} images, the counts have {len(counts)}")
    empty = (counts.true_area == 0).astype(np.float64)
    empty_sums = _group_sums(empty, groups, n_groups)
    sums = np.empty((passes.shape[1], n_groups, len(points), len(component_areas)))
    marked = np.zeros((passes.shape[1], n_groups, 2, len(points), len(component_areas)))
    class_rows = _class_rows(counts, groups, n_groups) if detections else []
    # Point by point (N x A at a time): all points at once would hold N x P x A arrays, hundreds of MB at scale.
    for p, cut in enumerate(point_cut):
        pred, inter = pred_cut[:, cut] * kept[:, p, None], inter_cut[:, cut] * kept[:, p, None]
        gain = dice_from_counts(inter, pred, counts.true_area[:, None]) - empty[:, None]  # N x A
        for g in range(n_groups):
            rows = groups == g
            sums[:, g, p] = empty_sums[g] + passes[rows].T.astype(np.float64) @ gain[rows]
        for g, classes in enumerate(class_rows):
            for c, rows in enumerate(classes):
                marked[:, g, c, p] = passes[rows].T.astype(np.float64) @ (pred[rows] > 0)
    sums[np.broadcast_to(~wanted[:, None, :, None], sums.shape)] = np.nan
    return (sums, marked) if detections else sums


def _evaluate_block(
    part: ImageSource,
    start: int,
    postprocessors: Sequence[PostProcessor],
    gates: np.ndarray | None,
    with_scores: bool = False,
) -> tuple[np.ndarray, ...]:
    pred, inter, true, scores = [], [], [], []
    for i, (levels, truth) in enumerate(part):
        full = to_original(levels, truth.shape)
        gate = None if gates is None else gates[start + i]
        masks = [pp(full, gate) for pp in postprocessors]
        pred.append([np.count_nonzero(m) for m in masks])
        inter.append([np.count_nonzero(m & truth) for m in masks])
        true.append(np.count_nonzero(truth))
        if with_scores:
            scores.append([pp.score(full, gate) for pp in postprocessors])
    shape = (len(true), len(postprocessors))
    counts = (
        np.array(pred, np.int64).reshape(shape),
        np.array(inter, np.int64).reshape(shape),
        np.array(true, np.int64),
    )
    return (*counts, np.array(scores, np.float64).reshape(shape)) if with_scores else counts


def evaluate(
    source: ImageSource,
    postprocessors: Sequence[PostProcessor],
    n_jobs: int = 1,
    block_size: int = BLOCK_SIZE,
    gates: np.ndarray | None = None,
    with_scores: bool = False,
) -> tuple[np.ndarray, ...]:
    """The straightforward method: bring each map to its original size, apply each strategy there, and count.

    Args:
        source: the images.
        postprocessors: the strategies, each called with the image's gate probability.
        n_jobs, block_size: as in :func:`count_thresholds`.
        gates: each image's gate probability, in the source's order; None: no gate (a gated strategy fails).
        with_scores: also return each image's image-level score under each strategy
            (:meth:`pneumoseg.postprocess.strategies.PostProcessor.score`, on the same full-size map).

    Returns:
        ``(pred_area, intersection, true_area)``: N x P, N x P and N integer arrays; the Dice of image ``i``
        under strategy ``p`` is ``dice_from_counts(intersection, pred_area, true_area[:, None])[i, p]``. With
        ``with_scores``, an N x P float array of the scores follows.
    """
    parts = _map_blocks(_evaluate_block, source, n_jobs, block_size, list(postprocessors), gates, with_scores)
    return tuple(np.concatenate(p) for p in zip(*parts))


def _first_best(scores: np.ndarray) -> int:
    return int(np.flatnonzero(scores >= scores.max() - TIE)[0])


OBJECTIVE_RATES = {"dice": None, "dice_at_sensitivity": "sensitivity", "dice_at_specificity": "specificity"}


@dataclass(frozen=True)
class Objective:
    """What the choice maximises: the mean Dice (``rate`` None), or the mean Dice among the candidates whose
    image-level ``rate`` (``sensitivity``: positive images marked; ``specificity``: empty images left empty) is at
    least ``minimum``; when no candidate reaches it, among those with the highest rate.

    Every rate is exact, from the per-image counts (:func:`exact_detections`), as the Dice is.
    """

    rate: str | None = None
    minimum: float = 0.0

    def rates(self, marked: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Each candidate's rate from ``marked`` (... x 2: positive and empty images marked) and ``classes`` (the
        positive and the empty images); 1 where the class is absent (no constraint to meet)."""
        if self.rate == "sensitivity":
            return marked[..., 0] / classes[0] if classes[0] else np.ones(marked.shape[:-1])
        return 1 - marked[..., 1] / classes[1] if classes[1] else np.ones(marked.shape[:-1])

    def feasible(self, marked: np.ndarray | None, classes: np.ndarray | None, valid: np.ndarray) -> np.ndarray:
        """Which candidates the choice is made among: the ``valid`` ones meeting the constraint (or, when none
        does, those with the highest rate); every valid one without a constraint."""
        if self.rate is None or marked is None or classes is None:
            return valid
        rates = np.where(valid, self.rates(marked, classes), -np.inf)
        met = valid & (rates >= self.minimum - TIE)
        return met if met.any() else valid & (rates >= rates.max() - TIE)

    def choose(self, dice: np.ndarray, marked: np.ndarray | None = None, classes: np.ndarray | None = None) -> int:
        """Index of the chosen candidate: the best ``dice`` among :meth:`feasible` (ties as for
        :attr:`SearchResult.best`); ``marked``: C x 2, ``classes``: 2, summed over the same images."""
        rows = np.flatnonzero(self.feasible(marked, classes, np.ones(len(dice), bool)))
        return int(rows[_first_best(dice[rows])])

    def to_block(self) -> dict[str, Any]:
        """The ``{name, params}`` block of ``search.objective``."""
        if self.rate is None:
            return {"name": "dice", "params": {}}
        return {"name": f"dice_at_{self.rate}", "params": {f"min_{self.rate}": self.minimum}}


def build_objective(block: Any) -> Objective:
    """``search.objective`` (a ``{name, params}`` block; None: the mean Dice) as an :class:`Objective`.

    Raises:
        ConfigError: an unknown name, or a minimum rate missing or outside [0, 1].
    """
    if block is None:
        return Objective()
    name, params = block.get("name"), dict(block.get("params") or {})
    if name not in OBJECTIVE_RATES:
        raise ConfigError(f"search.objective.name must be one of {', '.join(OBJECTIVE_RATES)}, not {name!r}")
    rate = OBJECTIVE_RATES[name]
    if rate is None:
        return Objective()
    key = f"min_{rate}"
    value = params.get(key)
    if set(params) != {key} or not isinstance(value, (int, float)) or not 0 <= float(value) <= 1:
        raise ConfigError(f"search.objective {name} takes params {{{key}: a rate in [0, 1]}}, got {params}")
    return Objective(rate, float(value))


@dataclass
class Nested:
    """The whole choice rerun on the other groups, scored on each held-out group.

    Attributes:
        choices: per group, the ``{name, params}`` block chosen on the other groups (component areas included).
        scores: per group, that choice's score on the group itself.
        score: the mean over all images of the held-out Dice.
    """

    choices: list[dict[str, Any]]
    scores: np.ndarray
    score: float
    met: np.ndarray | None = None

    @property
    def met_share(self) -> float | None:
        """With a constrained objective: the share of held-out groups on which the choice met the constraint."""
        return None if self.met is None else float(self.met.mean())


@dataclass
class SearchResult:
    """Every candidate evaluated, with its score per group.

    Attributes:
        candidates: one row per candidate: ``strategy`` (the grid's), the triplet-form columns ``top, min_area,
            bottom, min_component_area`` (the threshold form is ``top = bottom = threshold``, ``min_area = 0``,
            ``min_component_area`` = its ``min_area``), ``params`` (the strategy's own, as JSON), ``gate`` (the
            gate threshold of a gated candidate, NaN for an ungated one), ``method`` (``histogram`` or
            ``components``) and ``dice`` (mean over every image).
        group_sums: candidates x G, Dice summed over each group's images.
        group_sizes: images per group.
        surfaces: per strategy, its grid and the exact scores of its ungated candidates (len(tops) x
            len(min_areas) x len(bottoms), NaN where invalid), for plots.
        nested: the nested estimate of the whole choice (None with a single group).
        nested_by_gate: with gate thresholds searched (and several groups), the nested estimate of the choice
            among the ``ungated`` and among the ``gated`` candidates alone.
        group_marked: candidates x G x 2, the positive and the empty images each candidate marks per group (the
            candidates' ``sensitivity`` and ``specificity`` columns come from it).
        group_classes: G x 2, each group's positive and empty images.
        objective: what the choice maximised (:attr:`best`).
    """

    candidates: pd.DataFrame
    group_sums: np.ndarray
    group_sizes: np.ndarray
    surfaces: dict[str, tuple[Grid, np.ndarray]]
    nested: Nested | None = None
    nested_by_gate: dict[str, Nested] = field(default_factory=dict)
    group_marked: np.ndarray | None = None
    group_classes: np.ndarray | None = None
    objective: Objective = field(default_factory=Objective)

    @property
    def best(self) -> int:
        """Row of the best candidate under the objective. Scores within :data:`TIE` of the best count as equal,
        since sums taken in different orders differ in the last bits; the first such row wins (exact grid before
        components, ungated before gated, grids in their configured order)."""
        return self._choose(np.arange(len(self.candidates)))

    def _choose(self, rows: np.ndarray) -> int:
        marked = None if self.group_marked is None else self.group_marked[rows].sum(1)
        classes = None if self.group_classes is None else self.group_classes.sum(0)
        return int(rows[self.objective.choose(self.candidates["dice"].to_numpy()[rows], marked, classes)])

    def rows_of(self, strategy: str | None = None, gated: bool | None = None) -> np.ndarray:
        """Rows of the candidates of one grid's ``strategy`` (None: any), gated or not (None: both)."""
        keep = np.ones(len(self.candidates), bool)
        if strategy is not None:
            keep &= self.candidates["strategy"].to_numpy() == strategy
        if gated is not None:
            keep &= self.candidates["gate"].notna().to_numpy() == gated
        return np.flatnonzero(keep)

    def best_of(self, strategy: str | None = None, gated: bool | None = None) -> int:
        """Row of the best candidate among :meth:`rows_of` under the objective (ties as for :attr:`best`)."""
        rows = self.rows_of(strategy, gated)
        if not rows.size:
            raise ValueError(f"no candidate of strategy {strategy!r} (gated: {gated})")
        return self._choose(rows)

    def block(self, row: int) -> dict[str, Any]:
        """The ``{name, params}`` block of a candidate."""
        return _block(self.candidates.iloc[row])

    def group_scores(self, row: int) -> np.ndarray:
        return self.group_sums[row] / self.group_sizes


def _is_gated(candidate: pd.Series | dict) -> bool:
    return not np.isnan(float(candidate["gate"]))


def _block(candidate: pd.Series | dict) -> dict[str, Any]:
    inner = {"name": candidate["strategy"], "params": json.loads(candidate["params"])}
    if not _is_gated(candidate):
        return inner
    return {"name": GATED, "params": {"gate": float(candidate["gate"]), "inner": inner}}


@dataclass(frozen=True)
class _Variant:
    """A grid searched ungated (``threshold`` NaN) or behind one gate threshold; ``gate``: its column of the
    gate-pass matrix (column 0 keeps every image)."""

    grid: Grid
    gate: int = 0
    threshold: float = np.nan


def _rows(variant: _Variant, points: Iterable[tuple[float, float, float, float]], method: str) -> list[dict[str, Any]]:
    grid = variant.grid
    return [
        {
            "strategy": grid.strategy,
            **dict(zip(PARAM_COLUMNS, map(float, point))),
            "params": json.dumps(grid.params(*map(float, point))),
            "gate": variant.threshold,
            "method": method,
        }
        for point in points
    ]


@dataclass
class _Exact:
    """The exact grids' results: per variant its group sums and marked images, and every valid point as candidate
    rows, sums (candidates x G) and marked images (candidates x G x 2)."""

    variants: Sequence[_Variant]
    sums: list[np.ndarray]
    rows: list[dict[str, Any]]
    group_sums: np.ndarray
    marked: list[np.ndarray]
    group_marked: np.ndarray
    classes: np.ndarray
    objective: Objective

    @classmethod
    def of(
        cls,
        counts: ThresholdCounts,
        groups: np.ndarray,
        n_groups: int,
        variants: Sequence[_Variant],
        passes: np.ndarray,
        objective: Objective = Objective(),
    ) -> _Exact:
        sums = [exact_sums(counts, groups, n_groups, v.grid, passes[:, v.gate]) for v in variants]
        marked = [exact_detections(counts, groups, n_groups, v.grid, passes[:, v.gate]) for v in variants]
        rows, columns, marked_columns = [], [], []
        for variant, variant_sums, variant_marked in zip(variants, sums, marked):
            grid = variant.grid
            t, a, b = np.nonzero(~np.isnan(variant_sums[0]))
            rows += _rows(variant, zip(grid.tops[t], grid.min_areas[a], grid.bottoms[b], np.zeros(len(t))), "histogram")
            columns.append(variant_sums[:, t, a, b].T)
            marked_columns.append(variant_marked[:, :, t, a, b].transpose(2, 0, 1))
        classes = np.array([[rows.sum() for rows in pair] for pair in _class_rows(counts, groups, n_groups)])
        return cls(
            variants, sums, rows, np.concatenate(columns), marked, np.concatenate(marked_columns), classes, objective
        )

    def refine_points(self, train: np.ndarray, steps: int) -> list[list[tuple[float, float, float]]]:
        """Per variant, the points whose components are searched when choosing on the groups ``train``: those
        around the variant's best exact point on them under the objective (none for a grid without component
        areas)."""
        points: list[list[tuple[float, float, float]]] = []
        for variant, variant_sums, variant_marked in zip(self.variants, self.sums, self.marked):
            grid = variant.grid
            if not grid.component_areas.size:
                points.append([])
                continue
            surface = variant_sums[train].sum(0)
            marked = np.moveaxis(variant_marked[train].sum(0), 0, -1)  # T x A x B x 2
            feasible = self.objective.feasible(marked, self.classes[train].sum(0), ~np.isnan(surface))
            best = np.nanargmax(np.where(feasible, surface, np.nan))
            top, min_area, bottom = (int(i) for i in np.unravel_index(best, surface.shape))
            points.append(
                [
                    (grid.tops[i], grid.min_areas[j], grid.bottoms[k])
                    for i, j, k in grid.neighbours(top, min_area, bottom, steps)
                ]
            )
        return points


@dataclass
class _Refined:
    """The component pass of one component rule: ``sums`` (gates x G x points x areas, :func:`component_sums`),
    ``marked`` (gates x G x 2 x points x areas: the positive and the empty images each candidate marks) and the
    column of each point in them."""

    sums: np.ndarray
    marked: np.ndarray
    point_index: dict[tuple, int]

    @classmethod
    def of(
        cls,
        source: ImageSource,
        counts: ThresholdCounts,
        groups: np.ndarray,
        n_groups: int,
        variants: Sequence[_Variant],
        points: Sequence[list[list[tuple]]],
        areas: np.ndarray,
        passes: np.ndarray,
        rule: str,
        n_jobs: int,
        block_size: int,
    ) -> _Refined:
        """Refine every point that a choice of ``points`` (per choice, per variant) wants for a variant whose grid
        measures components by ``rule``."""
        unique = list(
            dict.fromkeys(
                p
                for choice in points
                for variant, variant_points in zip(variants, choice)
                if variant.grid.component_rule == rule
                for p in variant_points
            )
        )
        point_index = {p: k for k, p in enumerate(unique)}
        point_gates: list[set[int]] = [set() for _ in unique]
        for choice in points:
            for variant, variant_points in zip(variants, choice):
                if variant.grid.component_rule == rule:
                    for point in variant_points:
                        point_gates[point_index[point]].add(variant.gate)
        if not unique:
            return cls(
                np.zeros((passes.shape[1], n_groups, 0, len(areas))),
                np.zeros((passes.shape[1], n_groups, 2, 0, len(areas))),
                point_index,
            )
        sums, marked = component_sums(
            source,
            counts,
            groups,
            n_groups,
            unique,
            areas,
            passes,
            point_gates,
            n_jobs,
            block_size,
            rule,
            detections=True,
        )
        return cls(sums, marked, point_index)


def _choice(
    exact: _Exact, points: list[list[tuple]], refined: dict[str, _Refined], areas: np.ndarray
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Candidate rows, group sums and marked images of one choice: every exact point, then each variant's refined
    ``points`` (from the pass of the variant's component rule in ``refined``)."""
    rows, sums, marked = list(exact.rows), [exact.group_sums], [exact.group_marked]
    for variant, variant_points in zip(exact.variants, points):
        a_index = np.searchsorted(areas, variant.grid.component_areas)
        rule = refined[variant.grid.component_rule]
        for point in variant_points:
            rows += _rows(variant, ((*point, area) for area in variant.grid.component_areas), "components")
            sums.append(rule.sums[variant.gate][:, rule.point_index[point]][:, a_index].T)
            marked.append(rule.marked[variant.gate][:, :, rule.point_index[point]][:, :, a_index].transpose(2, 0, 1))
    return rows, np.concatenate(sums), np.concatenate(marked)


def _nested(
    choices: Sequence[tuple[list[dict[str, Any]], np.ndarray, np.ndarray]],
    trains: Sequence[np.ndarray],
    group_sizes: np.ndarray,
    exact: _Exact,
    gated: bool | None = None,
) -> Nested:
    """Per held-out group ``g``: the best of ``choices[g]``'s candidates on ``trains[g]`` under the objective (only
    the gated or the ungated ones, unless ``gated`` is None), scored on ``g``; with a constraint, also whether the
    choice met it on ``g``."""
    objective, classes = exact.objective, exact.classes
    chosen, held_out, met = [], np.empty(len(trains)), np.zeros(len(trains), bool)
    for g, (train, (rows, sums, marked)) in enumerate(zip(trains, choices)):
        is_gated = ~np.isnan(np.fromiter((row["gate"] for row in rows), float, len(rows)))
        candidates = np.flatnonzero(is_gated == gated if gated is not None else np.ones(len(rows), bool))
        best = candidates[
            objective.choose(
                sums[candidates][:, train].sum(1) / group_sizes[train].sum(),
                marked[candidates][:, train].sum(1),
                classes[train].sum(0),
            )
        ]
        chosen.append(_block(rows[best]))
        held_out[g] = sums[best, g]
        met[g] = objective.rate is None or objective.rates(marked[best, g], classes[g]) >= objective.minimum - TIE
    return Nested(
        chosen,
        held_out / group_sizes,
        float(held_out.sum() / group_sizes.sum()),
        None if objective.rate is None else met,
    )


def _gate_passes(
    gates: np.ndarray | None, gate_thresholds: Sequence[float] | None, n_images: int
) -> tuple[np.ndarray, np.ndarray]:
    """The gate thresholds (sorted, distinct) and the N x (1 + thresholds) matrix of the images each keeps
    (column 0: no gate, every image), as :class:`pneumoseg.postprocess.strategies.Gated` decides (p >= gate)."""
    values = _probabilities("gate_thresholds", gate_thresholds) if gate_thresholds else np.zeros(0)
    passes = [np.ones(n_images, bool)]
    if values.size:
        if gates is None:
            raise ConfigError(
                "search.gate_thresholds is set, but the OOF predictions have no gate probabilities "
                "(no gate.npy beside the OOF maps): train with a gate head "
                "(model.params.aux_params and loss.gate_weight), or set search.gate_thresholds=null"
            )
        gates = np.asarray(gates, dtype=np.float64)
        if gates.shape != (n_images,) or not np.all((gates >= 0) & (gates <= 1)):
            raise ValueError(f"need {n_images} gate probabilities in [0, 1], got shape {gates.shape}")
        passes += [gates >= value for value in values]
    return values, np.column_stack(passes)


def run_search(
    source: ImageSource,
    groups: np.ndarray,
    grids: Sequence[Grid],
    refine_steps: int = 2,
    n_jobs: int = 1,
    block_size: int = BLOCK_SIZE,
    counts: ThresholdCounts | None = None,
    gates: np.ndarray | None = None,
    gate_thresholds: Sequence[float] | None = None,
    objective: Objective = Objective(),
) -> SearchResult:
    """Search every grid exactly, then the component areas around each grid's best exact point, each grid also
    behind every gate threshold; and the same whole choice on the other groups for each group, for the nested
    estimate.

    Args:
        source: the images (read once or twice).
        groups: the group (fold index, 0..G-1) of each image, in the source's order.
        grids: the strategies' grids.
        refine_steps: how many ``bottom`` grid steps on each side of the best are refined with components.
        n_jobs, block_size: as in :func:`count_thresholds`.
        counts: threshold counts already made from ``source`` for :func:`grid_thresholds` (made here when None).
        gates: each image's gate probability, in the source's order (None: no gate head).
        gate_thresholds: the gate thresholds to search (``search.gate_thresholds``); None or empty: no gated
            candidates.
        objective: what each choice maximises (``search.objective``, :func:`build_objective`): the components
            are refined around each variant's best exact point under it, and it picks the answer and each nested
            choice.

    Raises:
        ConfigError: gate thresholds without gate probabilities, or outside [0, 1].
    """
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    group_sizes = np.bincount(groups, minlength=n_groups)
    counts = counts if counts is not None else count_thresholds(source, grid_thresholds(grids), n_jobs, block_size)
    if len(counts) != len(groups):
        raise ValueError(f"{len(groups)} group labels for {len(counts)} images")
    thresholds, passes = _gate_passes(gates, gate_thresholds, len(groups))
    variants = [_Variant(grid) for grid in grids]
    variants += [_Variant(grid, k + 1, float(value)) for k, value in enumerate(thresholds) for grid in grids]
    exact = _Exact.of(counts, groups, n_groups, variants, passes, objective)
    # Training groups of each choice: all of them (the answer), then all but one (the nested estimate).
    trains = [np.ones(n_groups, bool)] + ([np.arange(n_groups) != g for g in range(n_groups)] if n_groups > 1 else [])
    points = [exact.refine_points(train, refine_steps) for train in trains]
    areas = np.unique(np.concatenate([np.zeros(0)] + [g.component_areas for g in grids]))
    refined = {
        rule: _Refined.of(source, counts, groups, n_groups, variants, points, areas, passes, rule, n_jobs, block_size)
        for rule in dict.fromkeys(grid.component_rule for grid in grids)
    }
    rows, group_sums, group_marked = _choice(exact, points[0], refined, areas)
    candidates = pd.DataFrame(rows)
    candidates["dice"] = group_sums.sum(1) / len(groups)
    for rate in ("sensitivity", "specificity"):
        candidates[rate] = Objective(rate).rates(group_marked.sum(1), exact.classes.sum(0))
    surfaces = {
        v.grid.strategy: (v.grid, v_sums.sum(0) / len(groups))
        for v, v_sums in zip(exact.variants, exact.sums)
        if v.gate == 0
    }
    result = SearchResult(
        candidates,
        group_sums,
        group_sizes,
        surfaces,
        group_marked=group_marked,
        group_classes=exact.classes,
        objective=objective,
    )
    if n_groups > 1:
        choices = [_choice(exact, choice_points, refined, areas) for choice_points in points[1:]]
        result.nested = _nested(choices, trains[1:], group_sizes, exact)
        if thresholds.size:
            result.nested_by_gate = {
                name: _nested(choices, trains[1:], group_sizes, exact, gated)
                for name, gated in (("ungated", False), ("gated", True))
            }
    return result
