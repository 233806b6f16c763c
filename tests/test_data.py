import subprocess
import sys

import numpy as np
import pytest
import torch

from pneumoseg import layout
from pneumoseg.data.augment import build_augment
from pneumoseg.data.dataset import (
    ImageFiles,
    NaturalSampler,
    PositiveShareSampler,
    PreparedData,
    SamplerContext,
    build_sampler,
)
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.modeling.normalize import Normalize
from synthetic import write_prepared

HAS_MASK = np.array([True] * 6 + [False] * 14)


def test_natural_sampler_draws_every_image_once_in_a_new_order_each_epoch():
    sampler = NaturalSampler(SamplerContext(HAS_MASK, seed=1))
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        indices = [i for i, _ in sampler]
        assert sorted(indices) == list(range(len(HAS_MASK)))
        epochs.append(indices)
    assert epochs[0] != epochs[1]
    sampler.set_epoch(0)
    assert [i for i, _ in sampler] == epochs[0]


@pytest.mark.parametrize("epoch, expected_share", [(0, 0.8), (2, 0.6), (4, 0.4), (9, 0.4)])
def test_positive_share_moves_linearly_from_start_to_end(epoch, expected_share):
    sampler = PositiveShareSampler(
        SamplerContext(HAS_MASK, seed=0, total_epochs=5), start=0.8, end=0.4, samples_per_epoch=100
    )
    sampler.set_epoch(epoch)
    indices = np.array([i for i, _ in sampler])
    assert len(indices) == 100
    assert HAS_MASK[indices].mean() == pytest.approx(expected_share)


def test_positive_share_uses_every_image_before_repeating_one():
    sampler = PositiveShareSampler(SamplerContext(HAS_MASK, seed=0), start=0.5, end=0.5, samples_per_epoch=12)
    indices = [i for i, _ in sampler]
    positives = [i for i in indices if HAS_MASK[i]]
    assert sorted(positives) == list(range(6))  # 6 positive draws: each positive exactly once
    assert len(set(indices) - set(positives)) == 6  # 6 distinct negatives


@pytest.mark.parametrize(
    "sampler_block", [{"name": "natural"}, {"name": "positive_share", "params": {"start": 0.7, "end": 0.3}}]
)
def test_ranks_get_disjoint_equal_shards_of_the_same_epoch(sampler_block):
    n = len(HAS_MASK) + 1  # odd, so that padding is needed
    has_mask = np.append(HAS_MASK, True)
    shards = []
    for rank in range(3):
        sampler = build_sampler(sampler_block, has_mask, seed=5, total_epochs=4, num_replicas=3, rank=rank)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(sampler)
    single = build_sampler(sampler_block, has_mask, seed=5, total_epochs=4)
    single.set_epoch(2)
    draws = list(single)
    interleaved = [shards[i % 3][i // 3] for i in range(n)]
    assert interleaved == draws  # the shards are slices of the one epoch, with their seeds


def test_invalid_share_is_a_config_error():
    with pytest.raises(ConfigError):
        PositiveShareSampler(SamplerContext(HAS_MASK, seed=0), start=1.5)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize(channels):
    normalize = Normalize(mean=0.5, std=0.25, channels=channels)
    image = np.array([[0, 255], [128, 64]], np.uint8)
    out = normalize(image)
    assert out.shape == (channels, 2, 2) and out.dtype == torch.float32
    assert out[channels - 1, 0, 0].item() == pytest.approx(-2.0)
    assert out[0, 0, 1].item() == pytest.approx(2.0)
    assert normalize(np.stack([image, image])).shape == (2, channels, 2, 2)


def test_prepared_data_dataset_items(tmp_path):
    write_prepared(tmp_path, n_images=8, sizes=(32,))
    data = PreparedData.load(tmp_path, 32)
    train_rows, val_rows = data.split(0)
    assert set(train_rows["fold"]) == {1} and set(val_rows["fold"]) == {0}
    dataset = data.dataset(
        val_rows, Normalize(), build_augment({"transforms": [{"name": "HorizontalFlip", "params": {"p": 0.5}}]})
    )
    image, mask = dataset[0]
    assert image.shape == (1, 32, 32) and mask.shape == (1, 32, 32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert bool(mask.sum() > 0) == bool(val_rows["has_mask"].iloc[0])
    flips = {bool(torch.equal(dataset[(0, seed)][0], image)) for seed in range(8)}
    assert flips == {True, False}  # the seed decides the augmentation
    files = ImageFiles([layout.images_dir(tmp_path, 32) / f"{i}.png" for i in val_rows["ImageId"]])
    assert files[0].dtype == torch.uint8 and files[0].shape == (32, 32)


def test_missing_pngs_or_folds_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="stage 02"):
        PreparedData.load(tmp_path, 32)
    write_prepared(tmp_path, n_images=4, sizes=(32,))
    with pytest.raises(DataError, match="prepare.sizes"):
        PreparedData.load(tmp_path, 64)
    with pytest.raises(DataError, match="fold 7"):
        PreparedData.load(tmp_path, 32).split(7)


def test_loader_workers_survive_a_parent_that_used_opencv_threads(tmp_path):
    """A worker forked while the parent held an OpenCV thread pool used to hang in its first OpenCV call."""
    script = tmp_path / "fork_check.py"
    script.write_text(
        "import cv2, numpy as np, torch\n"
        "from pneumoseg.data.dataset import make_loader\n"
        "class Resized(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i): return cv2.resize(np.full((512, 512), i, np.uint8), (64, 64))\n"
        "cv2.setNumThreads(4)\n"
        "for _ in range(20): cv2.resize(np.zeros((2048, 2048), np.uint8), (1024, 1024))\n"
        "loader = make_loader(Resized(), 4, 2, torch.device('cpu'))\n"
        "for _ in range(2):\n"
        "    assert sum(len(b) for b in loader) == 8\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
