"""Training on random crops (data.train_crop): image and mask cut alike, lesion-holding windows at the configured
share, validation at full size."""

import cv2
import numpy as np
import pytest

from pneumoseg.data.augment import build_augment
from pneumoseg.data.dataset import RandomCrop, SegmentationDataset, crop_from_config
from pneumoseg.errors import ConfigError
from pneumoseg.modeling.normalize import Normalize


def _pair(size=64, seed=0, lesion=None):
    """A random image, and a mask marking ``lesion`` (a slice) or the image's pixels above 200."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if lesion is None:
        mask[image > 200] = 255
    else:
        mask[lesion] = 255
    return image, mask


@pytest.mark.parametrize("seed", range(20))
def test_a_crop_cuts_the_same_window_of_image_and_mask(seed):
    image, mask = _pair(seed=seed)
    crop = RandomCrop(24, lesion_share=0.5)
    cut_image, cut_mask = crop(image, mask, seed)
    assert cut_image.shape == cut_mask.shape == (24, 24)
    assert ((cut_image > 200) == (cut_mask > 127)).all()
    # and it is a window of the original at one place
    windows = np.lib.stride_tricks.sliding_window_view(image, (24, 24))
    ((top, left),) = np.argwhere((windows == cut_image).all((2, 3)))
    assert (mask[top : top + 24, left : left + 24] == cut_mask).all()


@pytest.mark.parametrize("share, low, high", [(1.0, 200, 200), (0.0, 0, 40), (0.5, 80, 140)])
def test_the_share_of_windows_holding_a_small_lesion(share, low, high):
    image, mask = _pair(size=128, lesion=np.s_[100:104, 10:14])  # 16 px in a corner
    crop = RandomCrop(32, lesion_share=share)
    holding = sum(crop(image, mask, seed)[1].any() for seed in range(200))
    assert low <= holding <= high


def test_every_lesion_pixel_can_be_reached_and_windows_stay_inside():
    _, mask = _pair(size=40, lesion=np.s_[0:40, 39:40])  # a lesion along the right edge
    crop = RandomCrop(16, lesion_share=1.0)
    origins = {crop.origin(mask, np.random.default_rng(seed)) for seed in range(400)}
    assert all(0 <= top <= 24 and left == 24 for top, left in origins)
    assert {0, 24} <= {top for top, _ in origins}


def test_the_dataset_crops_after_the_augmentation_and_only_when_asked(tmp_path):
    image, mask = _pair(size=48)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cv2.imwrite(str(tmp_path / "a_mask.png"), mask)
    flip = build_augment({"transforms": [{"name": "HorizontalFlip", "params": {"p": 1.0}}]})
    normalize = Normalize(mean=0.0, std=1.0)
    cropped = SegmentationDataset([tmp_path / "a.png"], [tmp_path / "a_mask.png"], normalize, flip, RandomCrop(20, 0.5))
    for seed in range(5):
        x, y = cropped[(0, seed)]
        assert x.shape == y.shape == (1, 20, 20)
        assert ((x[0] * 255 > 200.5) == (y[0] > 0.5)).all()
    full = SegmentationDataset([tmp_path / "a.png"], [tmp_path / "a_mask.png"], normalize)
    assert full[0][0].shape == (1, 48, 48)


def test_crop_settings_are_checked():
    assert crop_from_config({"train_crop": None}) is None
    assert crop_from_config({"train_crop": 32, "crop_lesion_share": 0.3}) == RandomCrop(32, 0.3)
    with pytest.raises(ConfigError, match="crop_lesion_share"):
        RandomCrop(32, 1.5)
    with pytest.raises(ConfigError, match="exceeds the 16 x 16 px"):
        RandomCrop(32)(*_pair(size=16), 0)
