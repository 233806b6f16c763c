import warnings
from pathlib import Path

import numpy as np
import pytest

from pneumoseg.config import load_config
from pneumoseg.data.augment import augment, build_augment, build_transform
from pneumoseg.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _case(size=64):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[20:40, 10:30] = 255
    return image, mask


@pytest.mark.parametrize("config", ["base.yaml", "demo.yaml", "tiny.yaml", "siim_unet_r34_512.yaml"])
def test_shipped_pipelines_build_and_run_without_any_albumentations_warning(config):
    image, mask = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline = build_augment(load_config(CONFIGS / config).augment)
        for seed in range(20):  # enough draws that every OneOf branch runs
            out_image, out_mask = augment(pipeline, image, mask, seed)
            assert out_image.shape == image.shape and out_image.dtype == np.uint8
            assert set(np.unique(out_mask)) <= {0, 255}


@pytest.mark.parametrize(
    "block",
    [
        {"name": "ShiftScaleRotate"},
        {"name": "GaussNoise", "params": {"var_limit": [10, 50]}},
        {"name": "ElasticTransform", "params": {"alpha_affine": 3}},
    ],
)
def test_deprecated_transforms_and_arguments_are_caught(block):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            build_transform(block)


def test_same_seed_same_augmentation_and_the_mask_moves_with_the_image():
    image, mask = _case()
    pipeline = build_augment(
        {
            "transforms": [
                {"name": "HorizontalFlip", "params": {"p": 0.5}},
                {"name": "Affine", "params": {"translate_px": [-8, 8], "p": 1.0}},
            ]
        }
    )
    outs = [augment(pipeline, image, mask, seed) for seed in (7, 7, 8)]
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert not np.array_equal(outs[0][0], outs[2][0])
    # The lesion's pixels travel with it: the masked image region is the transformed original region.
    flipped = augment(build_augment({"transforms": [{"name": "HorizontalFlip", "params": {"p": 1.0}}]}), image, mask, 0)
    assert np.array_equal(flipped[0], image[:, ::-1]) and np.array_equal(flipped[1], mask[:, ::-1])


def test_compositions_nest_and_an_empty_list_means_no_augmentation():
    pipeline = build_augment(
        {
            "transforms": [
                {
                    "name": "OneOf",
                    "params": {
                        "p": 1.0,
                        "transforms": [
                            {"name": "HorizontalFlip", "params": {"p": 1.0}},
                            {"name": "VerticalFlip", "params": {"p": 1.0}},
                        ],
                    },
                }
            ]
        }
    )
    image, mask = _case()
    out, _ = augment(pipeline, image, mask, 0)
    assert np.array_equal(out, image[:, ::-1]) or np.array_equal(out, image[::-1])
    assert build_augment({"transforms": []}) is None
    assert augment(None, image, mask, 0)[0] is image


def test_bad_augmentation_blocks_are_config_errors():
    with pytest.raises(ConfigError, match="unknown augmentation"):
        build_transform({"name": "ShiftScaleRotat"})
    with pytest.raises(ConfigError, match="not a composition"):
        build_transform({"name": "HorizontalFlip", "params": {"transforms": []}})
    with pytest.raises(ConfigError, match="Affine"):
        build_transform({"name": "Affine", "params": {"rotate": "a lot"}})
