"""The one resize module (pneumoseg.data.resize): images, masks and probability maps each follow one rule."""

import numpy as np
import pytest

from pneumoseg.data.resize import resize_mask, resize_probabilities


@pytest.mark.parametrize("rows, cols", [(32, 32), (64, 64), (16, 16), (50, 40), (20, 48)])
def test_resize_probabilities_of_one_map(rows, cols):
    probs = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    restored = resize_probabilities(probs, rows, cols)
    assert restored.shape == (rows, cols) and restored.dtype == np.float32
    if (rows, cols) == (16, 16):  # shrinking averages areas
        np.testing.assert_allclose(restored[0, 0], probs[:2, :2].mean(), rtol=1e-5)
    if (rows, cols) == (64, 64):  # growing is bilinear: the mean is kept up to the border
        assert restored.mean() == pytest.approx(probs.mean(), abs=0.01)


@pytest.mark.parametrize(
    "mask, size, expected",
    [
        pytest.param([[1, 0], [0, 1]], 2, [[255, 0], [0, 255]], id="same-size"),
        pytest.param([[0, 0], [0, 0]], 1, [[0]], id="empty"),
        pytest.param([[1, 0], [0, 0]], 1, [[0]], id="quarter-vanishes"),
        pytest.param([[1, 0], [1, 0]], 1, [[255]], id="half-kept"),
        pytest.param([[1, 1], [1, 0]], 1, [[255]], id="three-quarters"),
        pytest.param(
            [[1, 0], [0, 0]], 4, [[255, 255, 0, 0], [255, 255, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], id="upscale"
        ),
    ],
)
def test_resize_mask(mask, size, expected):
    out = resize_mask(np.array(mask, dtype=bool), size)
    assert out.dtype == np.uint8 and out.tolist() == expected


def test_resize_keeps_the_area_of_a_large_lesion():
    mask = np.zeros((1024, 1024), bool)
    mask[100:400, 200:332] = True
    assert resize_mask(mask, 256).astype(bool).sum() == mask.sum() // 16


@pytest.fixture
def input_dir(tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    return folder


def test_resize_probabilities_of_a_stack():
    maps = np.random.default_rng(2).random((2, 8, 8), dtype=np.float32)
    assert resize_probabilities(maps, 8, 8) is maps
    assert resize_probabilities(maps, 4, 4).shape == (2, 4, 4)
    np.testing.assert_allclose(resize_probabilities(maps, 4, 4)[0, 0, 0], maps[0, :2, :2].mean(), rtol=1e-5)
