"""The phantom: plans, determinism, lesion geometry and size distribution, and that it needs learning."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumoseg.demo import phantom
from pneumoseg.demo.phantom import CasePlan


def _case(seed: int, index: int, size: int, plan: CasePlan, split: int = 0):
    geometry, pixels = phantom.case_streams(seed, split, index)
    case = phantom.make_phantom(geometry, size, plan)
    return case, phantom.render(case, pixels)


def _lung_mask(case: phantom.Phantom) -> np.ndarray:
    return phantom._fill(case.size, case.anatomy.lungs, case.anatomy.pose) > 0.5


@pytest.mark.parametrize("n, rate", [(10, 0.0), (24, 0.4), (60, 0.22), (100, 0.22), (7, 1.0)])
def test_plan_has_exact_positive_count(n, rate):
    plans = phantom.plan_cases(n, rate, np.random.default_rng(0))
    assert len(plans) == n
    assert sum(p.n_instances > 0 for p in plans) == round(n * rate)


def test_plan_has_every_kind_of_case_even_when_small():
    plans = phantom.plan_cases(24, 0.4, np.random.default_rng(1))
    counts = [p.n_instances for p in plans]
    assert {0, 1, 2, 3} <= set(counts)
    assert any(p.overlapping for p in plans) and any(p.n_instances > 1 and not p.overlapping for p in plans)
    assert not any(p.overlapping and p.n_instances < 2 for p in plans)


def test_plan_rejects_a_rate_outside_0_1():
    with pytest.raises(ValueError, match="positive_rate"):
        phantom.plan_cases(10, 1.5, np.random.default_rng(0))


def test_same_seed_same_image_and_different_seed_split_or_index_differ():
    case, image = _case(5, 3, 128, CasePlan(1))
    again, image_again = _case(5, 3, 128, CasePlan(1))
    assert np.array_equal(image, image_again) and np.array_equal(case.mask, again.mask)
    for seed, index, split in [(6, 3, 0), (5, 4, 0), (5, 3, 1)]:
        _, other = _case(seed, index, 128, CasePlan(1), split)
        assert not np.array_equal(image, other)


def test_labels_do_not_depend_on_rendering():
    """Geometry comes from its own stream, so the labels can be recomputed without the pixels."""
    geometry, _ = phantom.case_streams(9, 0, 2)
    first = phantom.make_phantom(geometry, 128, CasePlan(2, True))
    geometry, pixels = phantom.case_streams(9, 0, 2)
    second = phantom.make_phantom(geometry, 128, CasePlan(2, True))
    phantom.render(second, pixels)
    assert all(np.array_equal(a, b) for a, b in zip(first.instances, second.instances))


@pytest.mark.parametrize("size", [64, 256])
def test_render_gives_a_full_size_8_bit_image_with_dark_air_and_bright_mediastinum(size):
    _, image = _case(2, 0, size, CasePlan(0))
    assert image.shape == (size, size) and image.dtype == np.uint8
    top_corner = image[: size // 20, : size // 20].mean()
    centre = image[int(size * 0.3) : int(size * 0.5), int(size * 0.47) : int(size * 0.53)].mean()
    assert top_corner < 60 < centre


@pytest.mark.parametrize(
    "plan", [CasePlan(1), CasePlan(2, False), CasePlan(3, False), CasePlan(2, True), CasePlan(3, True)]
)
def test_instances_lie_in_the_lungs_and_overlap_only_when_planned(plan):
    for index in range(3):
        case, _ = _case(11, index, 256, plan)
        assert len(case.instances) == plan.n_instances
        assert all(instance.any() for instance in case.instances)
        assert not (case.mask & ~_lung_mask(case)).any()
        pair_overlaps = [(a & b).any() for k, a in enumerate(case.instances) for b in case.instances[k + 1 :]]
        assert any(pair_overlaps) == plan.overlapping


def test_instance_areas_follow_the_real_distribution():
    """Real positive instances at 1024 px: median about 6,500 px, 5th percentile about 1,100, 95th about 35,000."""
    size = 256
    areas = []
    for index in range(150):
        geometry, _ = phantom.case_streams(4, 0, index)
        case = phantom.make_phantom(geometry, size, CasePlan(1))
        areas.append(case.mask.sum() * (phantom.REFERENCE_SIZE / size) ** 2)
    p5, median, p95 = np.percentile(areas, [5, 50, 95])
    assert 300 <= p5 <= 2500
    assert 4000 <= median <= 10000
    assert 18000 <= p95 <= 70000


def _downscale(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def _grow(mask: np.ndarray, k: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)


def _regions_at(case: phantom.Phantom, image: np.ndarray, size: int):
    """At ``size`` px (INTER_AREA): the image, the lesion's interior, the one-pixel line along its inner edge,
    and a band of lung around it; all away from the lung's own boundary, whose edge is not texture."""
    mask, lung = _downscale(case.mask, size) > 0.5, _downscale(_lung_mask(case), size) > 0.5
    deep = ~_grow(~lung, 7)
    interior = ~_grow(~mask, 3) & deep
    edge = _grow(mask, 3) & ~mask & deep
    around = _grow(mask, 15) & ~_grow(mask, 5) & lung
    return _downscale(image, size), interior, edge, around


def test_lesion_lacks_markings_and_has_a_bright_edge_at_128_px():
    """At the demo's 128 px the lesion is smoother than the lung around it and its inner edge is bright."""
    texture_ratios = []
    for index in range(16):
        case, image = _case(21, index, 1024, CasePlan(1))
        small, interior, edge, around = _regions_at(case, image, 128)
        if interior.sum() < 20:
            continue  # too small to measure texture at 128 px
        texture = np.abs(small - cv2.GaussianBlur(small, (0, 0), 1.5))
        texture_ratios.append(texture[interior].mean() / texture[around].mean())
        assert small[edge].mean() > small[interior].mean() + 15
    assert len(texture_ratios) >= 4
    assert np.median(texture_ratios) < 0.8


def test_intensity_rule_search_finds_a_rule_when_one_exists():
    """On images where the lesion is the only dark thing, the search must beat the empty baseline by far."""
    rng = np.random.default_rng(0)
    images = np.full((12, 32, 32), 150, np.uint8) + rng.integers(0, 10, (12, 32, 32)).astype(np.uint8)
    masks = np.zeros((12, 32, 32), bool)
    masks[::3, 5:15, 8:20] = True
    images[masks] = 40
    result = phantom.intensity_rule_search(images, masks, sigmas=(0, 1))
    assert result.baseline == pytest.approx(8 / 12)
    assert result.score > 0.95 and result.polarity == "dark"
    assert np.array_equal(
        phantom.apply_intensity_rule(images[0], result.sigma, result.polarity, result.threshold, result.min_area),
        masks[0],
    )


def test_no_intensity_rule_beats_predicting_nothing():
    """The demo needs learning: the best tuned threshold + minimum-area rule is within 0.02 of all-empty."""
    size, n = 512, 40
    plans = phantom.plan_cases(n, 0.3, np.random.default_rng(8))
    images, masks = [], []
    for index, plan in enumerate(plans):
        case, image = _case(8, index, size, plan)
        images.append(cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
        masks.append(_downscale(case.mask, 64) > 0.5)
    result = phantom.intensity_rule_search(np.stack(images), np.stack(masks), thresholds=range(8, 250, 8))
    assert result.baseline == pytest.approx(1 - round(n * 0.3) / n)
    assert result.margin <= 0.02
