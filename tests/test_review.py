"""The overlay of one prediction (``pneumoseg.reports.review.overlay``): what a person sees must be what the model
said, pixel by pixel."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumoseg.reports.review import HEAT_OPACITY, overlay

SIDE = 96


def _inferno(value: int) -> np.ndarray:
    """The RGB colour of ``value`` (0..255) in OpenCV's inferno map."""
    return cv2.applyColorMap(np.uint8([[value]]), cv2.COLORMAP_INFERNO)[0, 0, ::-1].astype(float)


@pytest.fixture
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)


def _body(picture: np.ndarray) -> np.ndarray:
    """The overlay below its caption bar."""
    return picture[-SIDE:]


@pytest.mark.parametrize("probability", [0.0, 0.25, 0.5, 1.0])
def test_the_heat_map_is_blended_in_proportion_to_the_probability(grey, probability):
    probs = np.full((SIDE, SIDE), probability, np.float32)
    picture = _body(overlay(grey, probs, np.zeros_like(grey, bool), "x", False))
    alpha = probability * HEAT_OPACITY
    expected = grey[..., None] * (1 - alpha) + _inferno(round(probability * 255)) * alpha
    assert np.abs(picture - expected).max() <= 1.0


def test_the_outline_is_drawn_round_the_mask_and_nowhere_else(grey):
    mask = np.zeros((SIDE, SIDE), bool)
    mask[30:60, 20:70] = True
    picture = _body(overlay(grey, np.zeros((SIDE, SIDE), np.float32), mask, "x", True))
    # anti-aliased: a line pixel is mostly the outline's green
    green = picture[..., 1].astype(int) - picture[..., [0, 2]].max(axis=2) > 100
    edge = mask ^ cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert green[edge].mean() > 0.8
    assert not green[40:50, 30:60].any() and not green[:20].any()  # inside the mask and far from it: the X-ray
    assert np.array_equal(picture[:20], np.repeat(grey[:20, :, None], 3, axis=2))


def test_a_large_image_is_shrunk_and_the_caption_bar_sits_on_top(grey):
    big = cv2.resize(grey, (3000, 2400), interpolation=cv2.INTER_NEAREST)
    picture = overlay(big, np.zeros(big.shape, np.float32), np.zeros(big.shape, bool), "PNEUMOTHORAX p=0.90", True)
    assert picture.shape[1] == 1024 and picture.shape[0] > 819
    bar = picture[: picture.shape[0] - 819]
    assert bar.max() > 0 and np.all(bar[..., 0] >= bar[..., 1])  # red text on black for a positive
