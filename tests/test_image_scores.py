"""The image-level score of every strategy: the probability it decides an image on."""

import numpy as np
import pytest

from pneumoseg.postprocess.strategies import Gated, Threshold, Triplet, kth_largest, scale_area


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_triplet_score_decides_its_top_test(dtype):
    rng = np.random.default_rng(0)
    for _ in range(40):
        probs = rng.random((64, 64)) ** rng.uniform(1, 8)
        probs = (probs * 255).round().astype(np.uint8) if dtype == np.uint8 else probs.astype(np.float32)
        top, min_area = float(rng.uniform(0.3, 0.95)), float(rng.choice([0, 250, 4000, 40000]))
        strategy = Triplet(top=top, min_area=min_area, bottom=top)
        passes = strategy(probs).any()
        # The top test passes exactly when the score exceeds top (the mask is p > bottom = top, so non-empty).
        assert passes == (strategy.score(probs) > top)


def test_kth_largest_matches_sorting():
    rng = np.random.default_rng(1)
    probs = rng.random((50, 50)).astype(np.float32) * 0.02
    for k in (1, 2, 17, 2500):
        assert kth_largest(probs, k) == float(np.sort(probs.ravel())[::-1][k - 1])
    assert kth_largest(probs, 2501) == 0.0
    levels = np.array([[0, 3], [255, 128]], np.uint8)
    assert kth_largest(levels, 2) == pytest.approx(128 / 255)


@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_of_levels_matches_sorting(seed):
    rng = np.random.default_rng(seed)
    levels = (rng.integers(0, 256, (64, 80)) // rng.integers(1, 30)).astype(np.uint8)  # many ties
    ordered = np.sort(levels.ravel())[::-1]
    for k in (2, 3, 50, 1000, levels.size - 1, levels.size):
        assert kth_largest(levels, k) == pytest.approx(ordered[k - 1] / 255, abs=1e-6), k


def test_threshold_and_gated_scores():
    probs = np.zeros((32, 32), np.float32)
    probs[3, 4] = 0.7
    assert Threshold(0.5).score(probs) == pytest.approx(0.7)
    gated = Gated(gate=0.5, inner={"name": "threshold", "params": {"threshold": 0.5}})
    assert gated.score(probs, 0.25) == 0.25
    with pytest.raises(ValueError, match="gate head"):
        gated.score(probs, None)
    assert scale_area(1024**2, probs.shape) == 32 * 32
