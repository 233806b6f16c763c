"""Exact grid search of post-processing parameters on out-of-fold (OOF) predictions, without re-binarising.

Probabilities are stored as 256 levels (:mod:`pneumoseg.data.probstore`), so one pass over the OOF maps builds, for
every image, the count of pixels at or above each level, overall and inside the truth mask
(:class:`LevelHistograms`). For any threshold these give the predicted area and the intersection with the truth,
hence the exact per-image Dice of every ``(top, min_area, bottom)`` triplet in O(1) per image; the mean over images
of a whole grid is one matrix product (:func:`exact_sums`).

Dropping small connected components needs labelled components, so their minimum area is searched in a second
pass, on a coarser sub-grid around the best exact point (:func:`component_sums`): one labelling per image and
threshold gives the exact Dice for every area at once.

:func:`evaluate` is the straightforward method (binarise and score every image with each strategy of
:mod:`pneumoseg.postprocess.strategies`): the reference of the tests and the benchmark, and the independent check of the chosen
strategy in stage 04.

Scores are kept as per-group sums (a group is a fold), so the score on any set of folds, and the nested estimate
of :func:`nested_estimate`, come without another pass.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import cv2
import numpy as np
import pandas as pd

from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.postprocess.strategies import PostProcessor, components, level_cut, scale_area
from pneumoseg.data.probstore import LEVELS
from pneumoseg.registry import Registry

Chunk = tuple[np.ndarray, np.ndarray]
"""A block of images: uint8 probability levels (B x H x W) and the boolean truth masks (B x H x W)."""

ChunkSource = Callable[[], Iterable[Chunk]]
"""Starts a fresh pass over every image, in the same order each time."""

PARAM_COLUMNS = ("top", "min_area", "bottom", "min_component_area")
TIE = 1e-12


@dataclass
class LevelHistograms:
    """Per-image pixel counts at or above each probability level.

    Attributes:
        above: N x 257 int32; ``above[i, j]`` is the number of pixels of image ``i`` with level >= ``j``
            (column 256 is 0).
        above_true: the same, counting only pixels inside the truth mask.
        shape: (H, W) of the maps, which scales the areas.
    """

    above: np.ndarray
    above_true: np.ndarray
    shape: tuple[int, int]

    def __len__(self) -> int:
        return len(self.above)

    @property
    def true_area(self) -> np.ndarray:
        return self.above_true[:, 0]

    def counts(self, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Per image and threshold (N x T): the number of pixels with p > t, and how many of them are true."""
        columns = [level_cut(t) + 1 for t in thresholds]
        return self.above[:, columns], self.above_true[:, columns]


def build_histograms(chunks: Iterable[Chunk]) -> LevelHistograms:
    """One pass over the OOF maps and truth masks -> :class:`LevelHistograms`."""
    hists, hists_true, shape = [], [], None
    for levels, truth in chunks:
        shape = levels.shape[1:]
        for image, mask in zip(levels, truth):
            hists.append(cv2.calcHist([image], [0], None, [LEVELS + 1], [0, LEVELS + 1]).ravel())
            hists_true.append(cv2.calcHist([image], [0], mask.view(np.uint8), [LEVELS + 1], [0, LEVELS + 1]).ravel())
    if shape is None:
        raise ValueError("no images to build histograms from")

    def cumulative(rows: list[np.ndarray]) -> np.ndarray:
        # calcHist counts in float32, exact up to 2**24 pixels per image (a 4096 px map).
        counts = np.stack(rows).astype(np.int32)
        above = np.cumsum(counts[:, ::-1], axis=1, dtype=np.int32)[:, ::-1]
        return np.concatenate([above, np.zeros((len(above), 1), np.int32)], axis=1)

    return LevelHistograms(cumulative(hists), cumulative(hists_true), tuple(shape))


def _values(key: str, spec: Sequence[float], low: float, high: float) -> np.ndarray:
    """The sorted, distinct grid values of a config list, checked to lie in [low, high]."""
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

    def __init__(self, tops: np.ndarray, min_areas: np.ndarray, bottoms: np.ndarray,
                 component_areas: np.ndarray) -> None:
        self.tops, self.min_areas, self.bottoms = tops, min_areas, bottoms
        self.component_areas = component_areas

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
    """

    strategy = "triplet"

    def __init__(self, top, min_area, bottom, min_component_area=()) -> None:
        super().__init__(_probabilities("triplet.top", top), _areas("triplet.min_area", min_area),
                         _probabilities("triplet.bottom", bottom),
                         _component_areas("triplet.min_component_area", min_component_area))
        if not self.valid().any():
            raise ConfigError("search grid triplet: every bottom exceeds every top; no candidate is left")

    def valid(self) -> np.ndarray:
        return self.bottoms[None, :] <= self.tops[:, None]

    def params(self, top, min_area, bottom, min_component_area):
        return {"top": top, "min_area": min_area, "bottom": bottom, "min_component_area": min_component_area}

    def neighbours(self, top, min_area, bottom, steps):
        return [(top, min_area, i) for i in self._near(bottom, steps) if self.valid()[top, i]]


def _group_sums(per_image: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum ``per_image`` (N x ...) over the images of each group -> G x ..."""
    out = np.zeros((n_groups, *per_image.shape[1:]))
    np.add.at(out, groups, per_image)
    return out


def exact_sums(hist: LevelHistograms, groups: np.ndarray, n_groups: int, grid: Grid) -> np.ndarray:
    """Summed Dice of every exact grid point, per group: G x len(tops) x len(min_areas) x len(bottoms).

    Args:
        hist: the images' histograms.
        groups: the group (fold index, 0..G-1) of each image.
        n_groups: G.
        grid: the strategy's grid. Invalid points are NaN.

    An image is empty when fewer than ``min_area`` of its pixels are above ``top``, else its mask is p > ``bottom``;
    so its Dice is ``empty`` (1 if the truth is empty, else 0) plus ``kept * (dice at bottom - empty)``, and the
    sum over images of a group is a product of the ``kept`` matrix with that gain.
    """
    above_top, _ = hist.counts(grid.tops)
    kept = above_top[:, :, None] >= scale_area(grid.min_areas, hist.shape)          # N x Tt x Ta
    pred, inter = hist.counts(grid.bottoms)
    empty = (hist.true_area == 0).astype(np.float64)
    gain = dice_from_counts(inter, pred, hist.true_area[:, None]) - empty[:, None]      # N x Tb
    n_points = len(grid.tops) * len(grid.min_areas)
    sums = np.empty((n_groups, n_points, len(grid.bottoms)))
    for g in range(n_groups):
        rows = groups == g
        sums[g] = empty[rows].sum() + kept[rows].reshape(-1, n_points).T.astype(np.float64) @ gain[rows]
    sums = sums.reshape(n_groups, len(grid.tops), len(grid.min_areas), len(grid.bottoms))
    sums[:, ~grid.valid()[:, None, :].repeat(len(grid.min_areas), axis=1)] = np.nan
    return sums


def _component_counts(levels: np.ndarray, truth: np.ndarray, cuts: Sequence[int],
                      min_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted area and intersection (len(cuts) x len(min_pixels)) of one image, for each level cut and each
    minimum component size (in pixels at this resolution)."""
    pred = np.zeros((len(cuts), len(min_pixels)), np.int64)
    inter = np.zeros_like(pred)
    lowest = levels > min(cuts)
    rows, cols = np.flatnonzero(lowest.any(1)), np.flatnonzero(lowest.any(0))
    if rows.size == 0:
        return pred, inter
    # Every mask of a higher cut lies inside the lowest one's bounding box; labelling only that box is much cheaper.
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    levels, truth = levels[box], truth[box]
    for k, cut in enumerate(cuts):
        labels, areas = components(levels > cut)
        if areas.size == 0:
            continue
        inside = np.bincount(labels[truth], minlength=areas.size + 1)[1:]
        keep = areas[None, :] >= min_pixels[:, None]                                    # A x components
        pred[k], inter[k] = keep @ areas, keep @ inside
    return pred, inter


def component_sums(chunks: Iterable[Chunk], hist: LevelHistograms, groups: np.ndarray, n_groups: int,
                   points: Sequence[tuple[float, float, float]], component_areas: np.ndarray) -> np.ndarray:
    """Summed Dice per group of each ``(top, min_area, bottom)`` point combined with each component area.

    Args:
        chunks: a pass over the images, in the order of ``hist``.
        hist: their histograms (they decide which images the ``top`` / ``min_area`` test keeps).
        groups, n_groups: as in :func:`exact_sums`.
        points: the exact points to refine.
        component_areas: minimum component areas, pixels of the 1024 px image.

    Returns:
        G x len(points) x len(component_areas).
    """
    tops, min_areas, bottoms = (np.array(v, dtype=np.float64) for v in zip(*points))
    above_top, _ = hist.counts(tops)
    kept = above_top >= scale_area(min_areas, hist.shape)                                # N x P
    cuts = np.array([level_cut(b) for b in bottoms])
    min_pixels = scale_area(component_areas, hist.shape)
    pred = np.zeros((len(hist), len(points), len(component_areas)), np.int64)
    inter = np.zeros_like(pred)
    index = 0
    for levels, truth in chunks:
        for image, mask in zip(levels, truth):
            selected = np.flatnonzero(kept[index])
            if selected.size:
                pred[index, selected], inter[index, selected] = _component_counts(
                    image, mask, cuts[selected], min_pixels)
            index += 1
    if index != len(hist):
        raise ValueError(f"the pass gave {index} images, the histograms have {len(hist)}")
    dice = dice_from_counts(inter, pred, hist.true_area[:, None, None])
    return _group_sums(dice, groups, n_groups)


def evaluate(chunks: Iterable[Chunk], postprocessors: Sequence[PostProcessor]) -> tuple[np.ndarray, ...]:
    """The straightforward method: apply each strategy to each image and count.

    Returns:
        ``(pred_area, intersection, true_area)``: N x P, N x P and N integer arrays; the Dice of image ``i``
        under strategy ``p`` is ``dice_from_counts(intersection, pred_area, true_area[:, None])[i, p]``.
    """
    pred, inter, true = [], [], []
    for levels, truth in chunks:
        for image, mask in zip(levels, truth):
            masks = [pp(image) for pp in postprocessors]
            pred.append([m.sum() for m in masks])
            inter.append([np.count_nonzero(m & mask) for m in masks])
            true.append(mask.sum())
    shape = (len(true), len(postprocessors))
    return (np.array(pred, np.int64).reshape(shape), np.array(inter, np.int64).reshape(shape),
            np.array(true, np.int64))


def _first_best(scores: np.ndarray) -> int:
    return int(np.flatnonzero(scores >= scores.max() - TIE)[0])


@dataclass
class Nested:
    """Parameters chosen on the other groups, scored on each held-out group.

    Attributes:
        choices: per group, the index of the candidate that scores best on the other groups.
        scores: per group, that candidate's score on the group itself.
        score: the mean over all images of the held-out Dice.
    """

    choices: np.ndarray
    scores: np.ndarray
    score: float


@dataclass
class SearchResult:
    """Every candidate evaluated, with its score per group.

    Attributes:
        candidates: one row per candidate: ``strategy``, the triplet-form columns ``top, min_area, bottom,
            min_component_area`` (the threshold form is ``top = bottom = threshold``, ``min_area = 0``,
            ``min_component_area`` = its ``min_area``), ``params`` (the strategy's own, as JSON), ``method``
            (``histogram`` or ``components``) and ``dice`` (mean over every image).
        group_sums: candidates x G, Dice summed over each group's images.
        group_sizes: images per group.
        surfaces: per strategy, its grid and the exact scores (len(tops) x len(min_areas) x len(bottoms), NaN
            where invalid), for plots.
    """

    candidates: pd.DataFrame
    group_sums: np.ndarray
    group_sizes: np.ndarray
    surfaces: dict[str, tuple[Grid, np.ndarray]]

    @property
    def best(self) -> int:
        """Row of the best candidate. Scores within :data:`TIE` of the best count as equal, since sums taken in
        different orders differ in the last bits; the first such row wins (exact grid before components, grids in
        their configured order)."""
        return _first_best(self.candidates["dice"].to_numpy())

    def best_of(self, strategy: str) -> int:
        """Row of the best candidate of one strategy (ties as for :attr:`best`)."""
        rows = np.flatnonzero(self.candidates["strategy"].to_numpy() == strategy)
        return int(rows[_first_best(self.candidates["dice"].to_numpy()[rows])])

    def block(self, row: int) -> dict[str, Any]:
        """The ``{name, params}`` block of a candidate."""
        candidate = self.candidates.iloc[row]
        return {"name": candidate["strategy"], "params": json.loads(candidate["params"])}

    def group_scores(self, row: int) -> np.ndarray:
        return self.group_sums[row] / self.group_sizes

    def nested(self) -> Nested | None:
        """The nested estimate (None with a single group)."""
        return nested_estimate(self.group_sums, self.group_sizes)


def nested_estimate(group_sums: np.ndarray, group_sizes: np.ndarray) -> Nested | None:
    """For each group, choose the candidate best on the other groups and score it on the group.

    Args:
        group_sums: candidates x G, Dice summed over each group's images.
        group_sizes: images per group.
    """
    n_groups = len(group_sizes)
    if n_groups < 2:
        return None
    others = (group_sums.sum(1, keepdims=True) - group_sums) / (group_sizes.sum() - group_sizes)
    choices = np.array([_first_best(column) for column in others.T])
    held_out = group_sums[choices, np.arange(n_groups)]
    return Nested(choices, held_out / group_sizes, float(held_out.sum() / group_sizes.sum()))


def _rows(grid: Grid, points: Iterable[tuple[float, float, float, float]], method: str) -> list[dict[str, Any]]:
    return [{"strategy": grid.strategy, **dict(zip(PARAM_COLUMNS, map(float, point))),
             "params": json.dumps(grid.params(*map(float, point))), "method": method} for point in points]


def run_search(source: ChunkSource, groups: np.ndarray, grids: Sequence[Grid], refine_steps: int = 2,
               hist: LevelHistograms | None = None) -> SearchResult:
    """Search every grid exactly, then the component areas around each grid's best exact point.

    Args:
        source: starts a pass over the images (called once or twice).
        groups: the group (fold index, 0..G-1) of each image, in the pass's order.
        grids: the strategies' grids.
        refine_steps: how many ``bottom`` grid steps on each side of the best are refined with components.
        hist: histograms already built from ``source`` (built here when None).
    """
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    group_sizes = np.bincount(groups, minlength=n_groups)
    hist = hist if hist is not None else build_histograms(source())
    if len(hist) != len(groups):
        raise ValueError(f"{len(groups)} group labels for {len(hist)} images")
    rows, sums, surfaces, refinements = [], [], {}, []
    for grid in grids:
        grid_sums = exact_sums(hist, groups, n_groups, grid)
        surfaces[grid.strategy] = (grid, grid_sums.sum(0) / len(groups))
        t, a, b = np.nonzero(~np.isnan(grid_sums[0]))
        rows += _rows(grid, zip(grid.tops[t], grid.min_areas[a], grid.bottoms[b], np.zeros(len(t))), "histogram")
        sums.append(grid_sums[:, t, a, b].T)
        if grid.component_areas.size:
            best = np.unravel_index(np.nanargmax(surfaces[grid.strategy][1]), grid_sums.shape[1:])
            points = [(grid.tops[i], grid.min_areas[j], grid.bottoms[k])
                      for i, j, k in grid.neighbours(*map(int, best), refine_steps)]
            refinements.append((grid, points))
    if refinements:
        all_points = [p for _, points in refinements for p in points]
        all_areas = np.unique(np.concatenate([grid.component_areas for grid, _ in refinements]))
        refined = component_sums(source(), hist, groups, n_groups, all_points, all_areas)   # G x P x A
        start = 0
        for grid, points in refinements:
            p_index = np.arange(start, start + len(points))
            a_index = np.searchsorted(all_areas, grid.component_areas)
            start += len(points)
            rows += _rows(grid, ((*points[p], all_areas[a]) for p in p_index - p_index[0] for a in a_index),
                          "components")
            sums.append(refined[:, p_index][:, :, a_index].reshape(n_groups, -1).T)
    group_sums = np.concatenate(sums)
    candidates = pd.DataFrame(rows)
    candidates["dice"] = group_sums.sum(1) / len(groups)
    return SearchResult(candidates, group_sums, group_sizes, surfaces)
