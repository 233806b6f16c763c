import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumoseg.data.probstore import dequantize
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.postprocess.strategies import (
    POSTPROCESSORS,
    Threshold,
    Triplet,
    above,
    build_postprocessor,
    level_cut,
    load_postprocessor,
    remove_small_components,
    remove_small_outlines,
    scale_area,
)

LEVELS = np.arange(256, dtype=np.uint8)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 0.5, 0.4, 0.7, 0.05, 102 / 255, 0.1 + 0.2, 1e-9, 1 - 1e-9])
def test_level_cut_agrees_with_float64_comparison(threshold):
    assert ((level_cut(threshold) < LEVELS) == (threshold < LEVELS / 255.0)).all()


def test_level_cut_at_the_ends():
    assert level_cut(0.0) == 0  # p > 0: every level but 0
    assert level_cut(1.0) == 255  # p > 1: nothing
    assert level_cut(0.999) == 254


def test_above_treats_levels_and_probabilities_alike():
    probs = np.linspace(0, 1, 64, dtype=np.float64).reshape(8, 8)
    levels = np.rint(probs * 255).astype(np.uint8)
    for threshold in (0.1, 0.5, 0.73):
        assert (above(levels, threshold) == (levels / 255.0 > threshold)).all()


@pytest.mark.parametrize(
    "area, shape, expected",
    [
        (1024, (1024, 1024), 1024.0),
        (1024, (256, 256), 64.0),
        (1000, (512, 512), 250.0),
        (100, (64, 64), 100 / 256),
        (0, (256, 256), 0.0),
    ],
)
def test_scale_area(area, shape, expected):
    assert scale_area(area, shape) == pytest.approx(expected)


def _squares(size: int, *boxes: tuple[int, int, int]) -> np.ndarray:
    """A boolean mask with filled squares (row, col, side)."""
    mask = np.zeros((size, size), bool)
    for row, col, side in boxes:
        mask[row : row + side, col : col + side] = True
    return mask


@pytest.mark.parametrize(
    "min_pixels, kept_sides", [(0, [2, 4, 6]), (4, [2, 4, 6]), (5, [4, 6]), (16, [4, 6]), (17, [6]), (37, [])]
)
def test_remove_small_components(min_pixels, kept_sides):
    boxes = {2: (0, 0, 2), 4: (10, 10, 4), 6: (20, 2, 6)}
    result = remove_small_components(_squares(32, *boxes.values()), min_pixels)
    assert (result == _squares(32, *(boxes[s] for s in kept_sides))).all()


def test_diagonal_neighbours_form_one_component():
    mask = np.eye(5, dtype=bool)  # 5 pixels touching only at corners
    assert remove_small_components(mask, 5).sum() == 5


@pytest.mark.parametrize("size", [256, 1024])
def test_threshold_min_area_is_in_pixels_of_the_original_image(size):
    scale = size // 256
    # Squares of 16x16 and 8x8 pixels at 256 px are 4096 and 1024 pixels of the 1024 px image.
    probs = _squares(size, (0, 0, 16 * scale), (100 * scale, 100 * scale, 8 * scale)).astype(np.float32) * 0.9
    kept = Threshold(threshold=0.5, min_area=2000)(probs)
    assert kept.sum() == (16 * scale) ** 2 and kept[0, 0] and not kept[100 * scale, 100 * scale]


@pytest.mark.parametrize(
    "peak, pixels_here, expected_pixels",
    [
        (0.9, 16, 64),  # exactly min_area pixels above top: kept, and drawn at bottom
        (0.9, 17, 0),  # one pixel short: declared empty
        (0.6, 0, 64),  # nothing above top, but min_area 0 keeps every image
        (0.6, 1, 0),  # nothing above top: empty
    ],
)
def test_triplet_gate_then_bottom(peak, pixels_here, expected_pixels):
    probs = np.zeros((256, 256), np.float32)
    probs[10:18, 10:18] = 0.5  # 64 pixels above bottom
    probs[12:16, 12:16] = peak  # 16 of them above top when peak is 0.9
    # min_area is in pixels of the 1024 px image: 16 of them per pixel at 256 px.
    mask = Triplet(top=0.8, min_area=pixels_here * 16, bottom=0.4)(probs)
    assert mask.sum() == expected_pixels


def test_triplet_drops_small_components_after_the_gate():
    probs = (_squares(256, (0, 0, 16), (100, 100, 4)) * 0.95).astype(np.float32)
    mask = Triplet(top=0.9, min_area=100, bottom=0.5, min_component_area=16 * 50)(probs)
    assert mask.sum() == 256 and not mask[100, 100]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), threshold=st.sampled_from([0.2, 0.5, 0.63]), area=st.sampled_from([0, 300, 5000]))
def test_triplet_with_top_equal_bottom_is_the_threshold_strategy(seed, threshold, area):
    levels = np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)
    triplet = Triplet(top=threshold, min_area=0, bottom=threshold, min_component_area=area)
    assert (triplet(levels) == Threshold(threshold=threshold, min_area=area)(levels)).all()


def test_levels_and_their_probabilities_give_the_same_mask():
    levels = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    strategy = Triplet(top=0.8, min_area=2000, bottom=0.45, min_component_area=300)
    assert (strategy(levels) == strategy(dequantize(levels).astype(np.float64))).all()


@pytest.mark.parametrize(
    "block",
    [
        {"name": "threshold", "params": {"threshold": 0.35, "min_area": 500}},
        {"name": "triplet", "params": {"top": 0.75, "min_area": 1000, "bottom": 0.4, "min_component_area": 0}},
    ],
)
def test_block_round_trip(block, tmp_path):
    strategy = build_postprocessor(block)
    assert strategy.to_block()["name"] == block["name"]
    assert build_postprocessor(strategy.to_block()) == strategy
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({**strategy.to_block(), "oof_score": 0.85}))
    assert load_postprocessor(path) == strategy


@pytest.mark.parametrize(
    "block, message",
    [
        ({"name": "nope"}, "unknown post-processing strategy 'nope'"),
        ({"name": "threshold", "params": {"threshold": 1.5}}, "threshold must be a probability"),
        ({"name": "threshold", "params": {"min_area": -1}}, "min_area must be >= 0"),
        ({"name": "triplet", "params": {"top": 0.4, "min_area": 0, "bottom": 0.6}}, "bottom .* must not exceed top"),
        ({"name": "triplet", "params": {"top": 0.4}}, "bad params"),
    ],
)
def test_bad_blocks_are_config_errors(block, message):
    with pytest.raises(ConfigError, match=message):
        build_postprocessor(block)


def test_registry_lists_every_strategy():
    assert POSTPROCESSORS.names() == ["gated", "threshold", "triplet"]


def test_load_postprocessor_names_the_missing_or_broken_file(tmp_path):
    with pytest.raises(DataError, match="04_search_thresholds.py"):
        load_postprocessor(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_postprocessor(tmp_path / "bad.json")


@pytest.mark.parametrize("threshold", [np.float64(0.1), 0.1, np.float32(0.1)])
def test_float_maps_are_compared_in_their_own_precision(threshold):
    # float32(0.1) is above 0.1: a float64 comparison would call it positive, the search's float32 counts would not.
    probs = np.full((2, 2), np.float32(0.1))
    assert not above(probs, threshold).any()
    assert not Threshold(threshold=float(threshold))(probs).any()


def _sneddy_remove_smallest(mask, min_contour_area):
    """A transcription of the 1st place's ``TripletSubmit.py:remove_smallest`` (uint8 mask in, 0/255 out)."""
    contours, _ = cv2.findContours(mask.copy(), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c for c in contours if cv2.contourArea(c) > min_contour_area]
    background = np.zeros(mask.shape, np.uint8)
    return cv2.drawContours(background, contours, -1, (255), thickness=cv2.FILLED)


def _outline_triplet(min_component_area, top=0.5, bottom=0.5):
    return Triplet(top=top, min_area=0, bottom=bottom, min_component_area=min_component_area, component_rule="outline")


@pytest.mark.parametrize(
    "side, limit, kept", [(10, 100, False), (11, 100, False), (12, 100, True), (10, 80, True), (10, 81, False)]
)
def test_outline_rule_measures_the_polygon_area_strictly_above_the_limit(side, limit, kept):
    # a side x side square's outline runs through its border pixels' centres: (side - 1)^2 (81 for 10, 121 for 12)
    probs = np.zeros((64, 64), np.float32)
    probs[5 : 5 + side, 5 : 5 + side] = 1.0
    mask = remove_small_outlines(probs > 0.5, limit)
    assert mask.sum() == (side * side if kept else 0)
    # at 1024 px the strategy's area is the limit itself
    big = np.zeros((1024, 1024), np.float32)
    big[5 : 5 + side, 5 : 5 + side] = 1.0
    assert _outline_triplet(limit)(big).sum() == (side * side if kept else 0)


@pytest.mark.parametrize("hole, filled", [(4, True), (10, False)])
def test_outline_rule_fills_a_small_hole_and_keeps_a_large_one(hole, filled):
    mask = np.zeros((64, 64), bool)
    mask[5:45, 5:45] = True
    mask[20 : 20 + hole, 20 : 20 + hole] = False
    kept = remove_small_outlines(mask, 100)
    assert kept.sum() == (40 * 40 if filled else mask.sum())
    assert (kept >= mask).all()
    # the pixel-count rule never fills a hole
    assert (remove_small_components(mask, 100) == mask).all()


@pytest.mark.parametrize("seed", range(4))
def test_outline_rule_is_the_winners_code_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    probs = cv2.GaussianBlur(rng.random((128, 128)).astype(np.float32), (0, 0), 2.0)
    probs = (probs - probs.min()) / (probs.max() - probs.min())
    for limit in (0.5, 10, 40, 100, 400):
        mask = (probs > 0.55).astype(np.uint8)
        expected = _sneddy_remove_smallest(mask, limit) > 0
        assert (remove_small_outlines(mask.astype(bool), limit) == expected).all()
        strategy = _outline_triplet(limit * 64, top=0.6, bottom=0.55)
        assert (strategy(probs) == expected).all()


def test_outline_rule_block_round_trip_and_label():
    strategy = _outline_triplet(100)
    assert build_postprocessor(strategy.to_block()) == strategy
    assert strategy.label() == "triplet:0.5:0:0.5:100:outline"
    plain = Triplet(top=0.5, min_area=0, bottom=0.5, min_component_area=100)
    assert "component_rule" not in plain.to_block()["params"] and plain.label() == "triplet:0.5:0:0.5:100"
    with pytest.raises(ConfigError, match="component_rule must be one of pixels, outline"):
        Triplet(top=0.5, min_area=0, bottom=0.5, component_rule="contour")
