"""CoarseElasticTransform: ElasticTransform's distortion from a displacement field drawn at low resolution."""

import random

import albumentations as A
import numpy as np
import pytest

from pneumoseg.data.augment import augment, build_augment, build_transform

SIZE = 128
PARAMS = {"alpha": 120, "sigma": 6.0, "p": 1.0}  # the base config's, at which the saving matters


def displacement(name: str, seed: int, params=PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """The (dx, dy) displacement field a transform draws for a SIZE x SIZE image."""
    transform = build_transform({"name": name, "params": params})
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    maps = transform.get_params_dependent_on_data({"shape": (SIZE, SIZE)}, {})
    grid = np.arange(SIZE, dtype=np.float32)
    return maps["map_x"] - grid, maps["map_y"] - grid[:, None]


def field_statistics(name: str) -> tuple[float, float]:
    """Mean over seeds of the field's spread (px) and of its RMS pixel-to-pixel change (px per px): its size and
    smoothness (a blocky field, constant over steps and then jumping, has a far larger RMS change)."""
    spread, roughness = [], []
    for seed in range(8):
        for field in displacement(name, seed):
            spread.append(field.std())
            roughness.append(np.sqrt(np.mean(np.diff(field, axis=0) ** 2) + np.mean(np.diff(field, axis=1) ** 2)))
    return float(np.mean(spread)), float(np.mean(roughness))


def test_the_coarse_field_is_as_large_and_as_smooth_as_the_full_resolution_one():
    coarse_spread, coarse_roughness = field_statistics("CoarseElasticTransform")
    full_spread, full_roughness = field_statistics("ElasticTransform")
    assert coarse_spread > 0.3  # it distorts at all
    assert coarse_spread == pytest.approx(full_spread, rel=0.3)
    assert coarse_roughness == pytest.approx(full_roughness, rel=0.3)


def test_the_coarse_field_moves_x_and_y_independently():
    dx, dy = displacement("CoarseElasticTransform", seed=3)
    assert dx.std() > 0.3 and dy.std() > 0.3
    # two independent fields (same_dxdy is False): not one field used for both directions
    assert abs(np.corrcoef(dx.ravel(), dy.ravel())[0, 1]) < 0.5


def test_the_mask_stays_aligned_with_the_image():
    cells = (np.indices((SIZE, SIZE)) // 16).sum(axis=0) % 2  # a checkerboard of 16 px cells
    image = (cells * 200 + 30).astype(np.uint8)
    mask = (cells * 255).astype(np.uint8)
    pipeline = build_augment({"transforms": [{"name": "CoarseElasticTransform", "params": PARAMS}]})
    for seed in range(4):
        moved_image, moved_mask = augment(pipeline, image, mask, seed)
        assert not np.array_equal(moved_mask, mask)
        inside = moved_image > 130  # the image's bright cells, wherever they went
        # only pixels on a cell's edge, where the image is interpolated and the mask is not, may differ
        assert np.mean(inside == (moved_mask > 127)) > 0.97
        assert set(np.unique(moved_mask)) <= {0, 255}


def test_same_seed_same_distortion():
    pipeline = A.Compose([build_transform({"name": "CoarseElasticTransform", "params": PARAMS})])
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
    mask = np.zeros_like(image)
    first, second = augment(pipeline, image, mask, 5)[0], augment(pipeline, image, mask, 5)[0]
    assert np.array_equal(first, second)
    assert not np.array_equal(first, augment(pipeline, image, mask, 6)[0])
