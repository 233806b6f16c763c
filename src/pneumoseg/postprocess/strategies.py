"""Probability map -> binary mask: the post-processing strategies, shared by the threshold search, inference and
the server.

A strategy is a small frozen dataclass behind one interface (:class:`PostProcessor`), chosen by name from
:data:`POSTPROCESSORS` with a ``{name, params}`` block, and turned back into such a block by
:meth:`PostProcessor.to_block` (stage 04 writes the chosen one to ``thresholds.json``).

* ``threshold``: pixels with p > ``threshold``, then connected components smaller than ``min_area`` are dropped.
* ``triplet`` (the 1st-place solution's): an image with fewer than ``min_area`` pixels above ``top`` is declared
  empty; otherwise the mask is p > ``bottom`` (``bottom`` <= ``top``), with components smaller than
  ``min_component_area`` dropped. With ``component_rule: outline`` the small regions are dropped as the winner's
  code (``TripletSubmit.py:remove_smallest``) drops them instead: by the polygon area of each outline, holes'
  outlines included (:func:`remove_small_outlines`).
* ``gated``: an image whose image-level gate probability (the model's classifier head, see
  :mod:`pneumoseg.modeling.models`) is below ``gate`` is empty; otherwise the ``inner`` strategy draws the mask.

Every strategy is called as ``strategy(probs, gate)``: ``gate`` is the image's gate probability, or None for a
model without the head; only ``gated`` reads it (:attr:`PostProcessor.needs_gate`).

Every strategy also names the image-level probability it decides an image on (:meth:`PostProcessor.score`), the
score of the detector reports (ROC, calibration): the largest pixel probability for ``threshold``, the
``min_area``-th largest for ``triplet`` (an image passes its ``top`` test exactly when that score is > ``top``),
the gate probability for ``gated``. An ensemble's is its blend's, since its strategy sees the blended map.

Areas are always given in pixels of the original 1024 x 1024 image and scaled to the resolution a strategy is
applied at (:func:`scale_area`), so one set of parameters serves 256 px OOF maps and 1024 px submissions alike.

Maps may be float probabilities or the uint8 levels of :mod:`pneumoseg.data.probstore` (p = level / 255). For levels,
p > t is decided by :func:`level_cut`, which gives exactly the answer of comparing ``level / 255`` with ``t`` in
float64, so the histogram-based search, which only knows levels, agrees with these classes to the pixel.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

import cv2
import numpy as np

from pneumoseg.data.probstore import LEVELS
from pneumoseg.errors import ConfigError
from pneumoseg.io import read_json
from pneumoseg.registry import Registry
from pneumoseg.stage_table import command

ORIGINAL_SIZE = 1024
# 8-connectivity: a lesion outline touching only diagonally is still one lesion.
CONNECTIVITY = 8
# How the triplet measures the small regions it drops: connected components' pixel counts, or (the 1st place's
# code) outlines' polygon areas.
PIXELS = "pixels"
OUTLINE = "outline"
COMPONENT_RULES = (PIXELS, OUTLINE)

_LEVEL_PROBS = np.arange(LEVELS + 1, dtype=np.float64) / LEVELS


def level_cut(threshold: float) -> int:
    """The largest uint8 level whose probability is <= ``threshold`` (-1 when there is none).

    A pixel of level ``v`` has p > ``threshold`` exactly when ``v > level_cut(threshold)``.
    """
    return int(np.searchsorted(_LEVEL_PROBS, float(threshold), side="right")) - 1


def above(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean map of p > ``threshold``, for float probabilities or uint8 levels (see the module docstring)."""
    if probs.dtype == np.uint8:
        return probs > level_cut(threshold)
    # In the map's own precision whatever the threshold's type (a numpy float64 would otherwise promote the
    # comparison), so that the search, which counts float32 maps against float32 thresholds, agrees to the pixel.
    return probs > probs.dtype.type(threshold)


def scale_area(area: float | np.ndarray, shape: tuple[int, ...]) -> float | np.ndarray:
    """An area in pixels of the original 1024 x 1024 image, expressed in pixels of a map of ``shape`` (H, W)."""
    height, width = shape[-2:]
    return np.asarray(area, dtype=np.float64) * (height * width / ORIGINAL_SIZE**2)


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the connected components of a boolean mask.

    Returns:
        ``(labels, areas)``: an int32 label image (0 = background, components 1..n) and the pixel area of each
        component (``areas[k - 1]`` is the area of label ``k``).
    """
    image = np.ascontiguousarray(mask).view(np.uint8)
    # connectedComponentsWithStats costs 3-4x more than labelling plus a bincount at 1024 px (its statistics
    # pass dominates), and the areas are all we need: this is most of stage 05's post-processing time.
    count, labels = cv2.connectedComponents(image, connectivity=CONNECTIVITY)
    return labels, np.bincount(labels.ravel(), minlength=count)[1:]


def outlines(mask: np.ndarray) -> tuple[Sequence[np.ndarray], np.ndarray]:
    """Every outline of a boolean mask, outer and hole alike (``cv2.RETR_TREE``), and each one's polygon area.

    The area is ``cv2.contourArea`` of the outline through the border pixels' centres: a filled 10 x 10 square
    measures 81, a one-pixel speck 0.
    """
    found, _ = cv2.findContours(np.ascontiguousarray(mask).view(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    return cast(Sequence[np.ndarray], found), np.array(
        [cv2.contourArea(outline) for outline in found], dtype=np.float64
    )


def draw_outlines(shape: tuple[int, ...], kept: Sequence[np.ndarray]) -> np.ndarray:
    """The boolean mask of ``shape`` (H, W) with the outlines ``kept`` drawn filled, all in one call: a hole whose
    outline is among them stays empty, a hole whose outline is not is filled."""
    canvas = np.zeros(shape, np.uint8)
    if len(kept):
        cv2.drawContours(canvas, list(kept), -1, 1, thickness=cv2.FILLED)
    return canvas.view(bool)


def remove_small_outlines(mask: np.ndarray, min_area: float) -> np.ndarray:
    """sneddy's rule (1st place): the outlines of ``mask`` (:func:`outlines`) whose polygon area is strictly above
    ``min_area`` (at the mask's resolution), drawn filled together (:func:`draw_outlines`); the others are dropped.

    Unlike :func:`remove_small_components`, a region is measured by its outline's area (smaller than its pixel
    count: the border pixels count half), and a small hole inside a kept region is filled.
    """
    if min_area <= 0 or not mask.any():
        return mask
    found, areas = outlines(mask)
    return draw_outlines(mask.shape[-2:], [outline for outline, area in zip(found, areas) if area > min_area])


# Cuts tried, highest first, for the pixels holding the k largest probabilities of a map.
_CUTS = (0.5, 0.2, 0.05, 0.01)
_EXACT_HISTOGRAM_PIXELS = 2**24  # OpenCV counts in float32, exact up to here


def kth_largest(probs: np.ndarray, k: int) -> float:
    """The ``k``-th largest pixel probability of a map (float probabilities or uint8 levels), as a probability;
    0.0 when the map has fewer than ``k`` pixels."""
    flat = probs.ravel()
    if k > flat.size:
        return 0.0
    if k == 1:
        value = flat.max()
    elif flat.dtype == np.uint8 and flat.size < _EXACT_HISTOGRAM_PIXELS:
        # The k-th largest level is where the histogram, summed from the top, reaches k: one pass of OpenCV's
        # histogram, several times faster than selecting and partitioning the high pixels (stage 04 scores every
        # OOF map this way, at its full size).
        counts = cv2.calcHist([flat.reshape(1, -1)], [0], None, [256], [0, 256]).ravel()
        value = 255 - int(np.searchsorted(np.cumsum(counts[::-1]), k))
    else:
        # Partitioning only the pixels above the highest cut that leaves k of them costs a few compares instead of
        # a partition of the whole map: most pixels of a map are near 0.
        values = flat
        for cut in _CUTS:
            high = flat > (level_cut(cut) if flat.dtype == np.uint8 else flat.dtype.type(cut))
            if np.count_nonzero(high) >= k:
                values = flat[high]
                break
        value = np.partition(values, values.size - k)[values.size - k]
    return float(_LEVEL_PROBS[value]) if flat.dtype == np.uint8 else float(value)


def remove_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_pixels`` pixels (at the mask's resolution)."""
    if min_pixels <= 0 or not mask.any():
        return mask
    labels, areas = components(mask)
    keep = np.concatenate([[False], areas >= min_pixels])
    return keep[labels]


class PostProcessor(ABC):
    """Turns one probability map (H x W, float in [0, 1] or uint8 levels) into a boolean mask of the same size."""

    name: ClassVar[str]
    needs_gate: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, probs: np.ndarray, gate: float | None = None) -> np.ndarray:
        """The boolean H x W mask of ``probs``; ``gate``: the image's gate probability (None without a gate head),
        read only by strategies with :attr:`needs_gate`."""

    def score(self, probs: np.ndarray, gate: float | None = None) -> float:
        """The image-level probability this strategy decides the image on (see the module docstring); here the
        map's largest pixel probability. ``probs`` and ``gate`` as for :meth:`__call__`."""
        return kth_largest(probs, 1)

    def emptied_by_gate(self, probs: np.ndarray, gate: float | None) -> bool:
        """True when the gate alone emptied this image: the mask strategy would have marked pixels, the gate
        probability was below the threshold. Always False for an ungated strategy."""
        return False

    def label(self) -> str:
        """A short name for logs and table columns: the strategy and its parameter values, e.g.
        ``triplet:0.75:2000:0.4:0`` (in the order of the class's fields)."""
        return ":".join([self.name, *(f"{value:g}" for value in asdict(cast(Any, self)).values())])

    def to_block(self) -> dict[str, Any]:
        """The ``{name, params}`` block that :func:`build_postprocessor` turns back into this strategy."""
        return {"name": self.name, "params": asdict(cast(Any, self))}  # every strategy is a dataclass


POSTPROCESSORS: Registry[PostProcessor] = Registry("post-processing strategy")


def _check_probability(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{owner}: {key} must be a probability in [0, 1], got {value}")


def _check_area(owner: str, **values: float) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"{owner}: {key} must be >= 0 pixels (of the 1024 px image), got {value}")


def check_component_rule(owner: str, rule: str) -> None:
    """Raise a ConfigError naming ``owner`` unless ``rule`` is one of :data:`COMPONENT_RULES`."""
    if rule not in COMPONENT_RULES:
        raise ConfigError(f"{owner}: component_rule must be one of {', '.join(COMPONENT_RULES)}, got {rule!r}")


@POSTPROCESSORS.register("threshold")
@dataclass(frozen=True)
class Threshold(PostProcessor):
    """Pixels with p > ``threshold``; components under ``min_area`` (pixels of the 1024 px image) are dropped."""

    name: ClassVar[str] = "threshold"
    threshold: float = 0.5
    min_area: float = 0.0

    def __post_init__(self) -> None:
        _check_probability(self.name, threshold=self.threshold)
        _check_area(self.name, min_area=self.min_area)

    def __call__(self, probs: np.ndarray, gate: float | None = None) -> np.ndarray:
        return remove_small_components(above(probs, self.threshold), float(scale_area(self.min_area, probs.shape)))


@POSTPROCESSORS.register("triplet")
@dataclass(frozen=True)
class Triplet(PostProcessor):
    """The 1st-place rule: empty unless at least ``min_area`` pixels have p > ``top``; then p > ``bottom``.

    Args:
        top: the confident threshold that decides whether the image has a lesion at all.
        min_area: pixels (of the 1024 px image) above ``top`` needed to predict anything.
        bottom: the threshold that draws the mask of an image kept by the ``top`` test; <= ``top``.
        min_component_area: components under this many pixels (of the 1024 px image) are dropped; with the
            ``outline`` rule, outlines whose polygon area is not above it.
        component_rule: ``pixels`` (connected components' pixel counts, the default) or ``outline`` (the 1st
            place's code: :func:`remove_small_outlines`).
    """

    name: ClassVar[str] = "triplet"
    top: float
    min_area: float
    bottom: float
    min_component_area: float = 0.0
    component_rule: str = PIXELS

    def __post_init__(self) -> None:
        _check_probability(self.name, top=self.top, bottom=self.bottom)
        _check_area(self.name, min_area=self.min_area, min_component_area=self.min_component_area)
        if self.bottom > self.top:
            raise ConfigError(f"triplet: bottom ({self.bottom}) must not exceed top ({self.top})")
        check_component_rule(self.name, self.component_rule)

    def __call__(self, probs: np.ndarray, gate: float | None = None) -> np.ndarray:
        if above(probs, self.top).sum() < scale_area(self.min_area, probs.shape):
            return np.zeros(probs.shape, dtype=bool)
        mask = above(probs, self.bottom)
        limit = float(scale_area(self.min_component_area, probs.shape))
        if self.component_rule == OUTLINE:
            return remove_small_outlines(mask, limit)
        return remove_small_components(mask, limit)

    def label(self) -> str:
        numbers = (self.top, self.min_area, self.bottom, self.min_component_area)
        rule = "" if self.component_rule == PIXELS else f":{self.component_rule}"
        return ":".join([self.name, *(f"{value:g}" for value in numbers)]) + rule

    def to_block(self) -> dict[str, Any]:
        block = super().to_block()
        if self.component_rule == PIXELS:  # the default: blocks written before the option stay as they were
            del block["params"]["component_rule"]
        return block

    def score(self, probs: np.ndarray, gate: float | None = None) -> float:
        """The ``min_area``-th largest pixel probability (the largest with ``min_area`` 0): the image passes the
        ``top`` test exactly when this is > ``top``."""
        return kth_largest(probs, max(1, int(np.ceil(scale_area(self.min_area, probs.shape)))))


@POSTPROCESSORS.register("gated")
@dataclass(frozen=True)
class Gated(PostProcessor):
    """Empty when the image's gate probability is below ``gate``; otherwise the ``inner`` strategy's mask.

    Args:
        gate: the gate threshold; an image is kept when its probability is >= ``gate`` (0 keeps every image).
        inner: the mask strategy of kept images, a ``{name, params}`` block (or a built strategy); not gated.
    """

    name: ClassVar[str] = "gated"
    needs_gate: ClassVar[bool] = True
    gate: float
    inner: PostProcessor

    def __post_init__(self) -> None:
        _check_probability(self.name, gate=self.gate)
        inner = self.inner if isinstance(self.inner, PostProcessor) else build_postprocessor(self.inner)
        if inner.needs_gate:
            raise ConfigError("gated: the inner strategy must not be gated itself; give one gate threshold")
        object.__setattr__(self, "inner", inner)  # frozen: set once, here

    def __call__(self, probs: np.ndarray, gate: float | None = None) -> np.ndarray:
        if gate is None:
            raise ValueError(
                "the gated strategy needs each image's gate probability; this model has no gate head "
                "(model.params.aux_params)"
            )
        if float(gate) < self.gate:
            return np.zeros(probs.shape, dtype=bool)
        return self.inner(probs)

    def score(self, probs: np.ndarray, gate: float | None = None) -> float:
        """The gate probability: the image is kept exactly when it is >= ``gate``."""
        if gate is None:
            raise ValueError(
                "the gated strategy scores an image by its gate probability; this model has no gate "
                "head (model.params.aux_params)"
            )
        return float(gate)

    def emptied_by_gate(self, probs: np.ndarray, gate: float | None) -> bool:
        return gate is not None and float(gate) < self.gate and bool(self.inner(probs).any())

    def label(self) -> str:
        return f"{self.name}:{self.gate:g}:{self.inner.label()}"

    def to_block(self) -> dict[str, Any]:
        return {"name": self.name, "params": {"gate": self.gate, "inner": self.inner.to_block()}}


def build_postprocessor(block: Mapping[str, Any]) -> PostProcessor:
    """The strategy a ``{name, params}`` block names (extra keys, such as a stored score, are ignored)."""
    return POSTPROCESSORS.build(block)


def load_postprocessor(path: str | os.PathLike) -> PostProcessor:
    """The strategy stored in a JSON file holding a ``{name, params}`` block (stage 04's ``thresholds.json``)."""
    block = read_json(
        path,
        missing=f"post-processing file {path} not found; run {command('04')} "
        f"first, or configure the strategy in the config",
        invalid_fix=f"rerun {command('04')} --force",
    )
    return build_postprocessor(block)
