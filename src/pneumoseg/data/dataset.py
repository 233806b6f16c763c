"""Training data: the prepared PNGs of stages 01 and 02, a Dataset over them, and epoch samplers.

Inputs (``prepared_dir`` = ``${paths.prepared_dir}``, ``S`` = the training size):

* ``01_convert/images_<S>/<ImageId>.png``: 8-bit grey, S x S.
* ``02_labels/masks_<S>/<ImageId>.png``: 0/255 masks of the training images.
* ``02_labels/folds.csv``: ``ImageId, fold, has_mask, ...``.

Samplers (``sampler: {name, params}``) decide which images an epoch draws and give each draw its own
augmentation seed; they shard the epoch across distributed ranks like torch's DistributedSampler (``set_epoch``
before each epoch, the same permutation on every rank, each rank a disjoint slice, padded to equal length):

* ``natural``: every training image once per epoch, shuffled.
* ``positive_share``: ``samples_per_epoch`` draws (default: the number of training images) of which a share
  ``start`` of positive images in the first epoch moves linearly to ``end`` by epoch ``epochs`` (default: the
  run's epochs), as the top 2019 solutions did to learn from the positives first and calibrate on empties later.
  Each group is drawn without replacement until it is used up, then again in a new order.

Crops (``data.train_crop: N``, :class:`RandomCrop`): each training sample is an N x N window of the augmented
full-size image and the same window of its mask; of an image with a lesion, a share ``data.crop_lesion_share`` of
the windows is placed to hold a lesion pixel (one drawn uniformly from the mask), the others anywhere. Validation
and prediction see the full-size images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumoseg import layout
from pneumoseg.data.augment import augment
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import read_png
from pneumoseg.modeling.normalize import Normalize
from pneumoseg.registry import Registry
from pneumoseg.stage_table import command

FOLD_COLUMNS = ("ImageId", "fold", "has_mask")


@dataclass
class PreparedData:
    """The fold table and image/mask folders of one prepared dataset at one size.

    Attributes:
        folds: ``folds.csv`` (at least ImageId, fold, has_mask), ImageId as str.
        image_dir: ``01_convert/images_<S>``.
        mask_dir: ``02_labels/masks_<S>``.
    """

    folds: pd.DataFrame
    image_dir: Path
    mask_dir: Path

    @classmethod
    def load(cls, prepared_dir: str | os.PathLike, size: int) -> PreparedData:
        """Read ``folds.csv`` and check that every image and mask PNG of size ``size`` exists.

        Raises:
            DataError: a missing file or column, naming the stage to rerun.
        """
        folds_path = layout.folds_path(prepared_dir)
        if not folds_path.is_file():
            raise DataError(f"{folds_path} not found: run stage 02 ({command('02')}) with this config first")
        folds = pd.read_csv(folds_path, dtype={"ImageId": str})
        missing_columns = [c for c in FOLD_COLUMNS if c not in folds.columns]
        if missing_columns:
            raise DataError(f"{folds_path} lacks columns {missing_columns}; rerun stage 02 with --force")
        folds["has_mask"] = folds["has_mask"].astype(bool)
        data = cls(folds, layout.images_dir(prepared_dir, size), layout.masks_dir(prepared_dir, size))
        for folder, stage in ((data.image_dir, f"01 ({command('01')})"), (data.mask_dir, f"02 ({command('02')})")):
            missing = [i for i in folds["ImageId"] if not (folder / f"{i}.png").is_file()]
            if missing:
                raise DataError(
                    f"{len(missing)} of {len(folds)} PNGs are missing in {folder} (e.g. {missing[0]}.png). The "
                    f"training size is {size} px: it must be one of prepare.sizes; rerun stage {stage}."
                )
        return data

    def fold_numbers(self) -> list[int]:
        return sorted(int(f) for f in self.folds["fold"].unique())

    def split(self, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(training rows, validation rows) of ``fold``: validation is the fold, training the rest."""
        is_val = self.folds["fold"].to_numpy() == fold
        if not is_val.any():
            raise DataError(f"fold {fold} has no images; the folds are {self.fold_numbers()}")
        return self.folds[~is_val].reset_index(drop=True), self.folds[is_val].reset_index(drop=True)

    def dataset(
        self,
        rows: pd.DataFrame,
        normalize: Normalize,
        transform: A.Compose | None = None,
        crop: RandomCrop | None = None,
    ) -> SegmentationDataset:
        """The :class:`SegmentationDataset` of ``rows`` (their images and masks), with these arguments."""
        ids = rows["ImageId"].tolist()
        return SegmentationDataset(
            [self.image_dir / f"{i}.png" for i in ids],
            [self.mask_dir / f"{i}.png" for i in ids],
            normalize,
            transform,
            crop,
        )


@dataclass(frozen=True)
class RandomCrop:
    """A random ``size`` x ``size`` window of an image and its mask (see the module docstring).

    Args:
        size: the window's side in pixels; at most the images' side.
        lesion_share: for an image whose mask has a lesion, the probability that the window is placed to hold one
            of its pixels; in [0, 1].
    """

    size: int
    lesion_share: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"data.train_crop must be a positive number of pixels, got {self.size}")
        if not 0.0 <= self.lesion_share <= 1.0:
            raise ConfigError(f"data.crop_lesion_share must be in [0, 1], got {self.lesion_share}")

    def origin(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """The window's top-left corner (row, column) in ``mask``'s frame."""
        height, width = mask.shape[:2]
        if self.size > min(height, width):
            raise ConfigError(
                f"data.train_crop={self.size} exceeds the {height} x {width} px training images; "
                f"give a smaller crop or a larger train.image_size"
            )
        lesion = np.flatnonzero(mask.reshape(-1) > 127)
        if lesion.size and rng.random() < self.lesion_share:
            row, col = divmod(int(lesion[rng.integers(lesion.size)]), width)
            # uniformly among the windows that hold (row, col)
            return (
                int(rng.integers(max(row - self.size + 1, 0), min(row, height - self.size) + 1)),
                int(rng.integers(max(col - self.size + 1, 0), min(col, width - self.size) + 1)),
            )
        return int(rng.integers(height - self.size + 1)), int(rng.integers(width - self.size + 1))

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The same window of ``image`` and ``mask`` (H x W arrays), placed by ``seed``."""
        top, left = self.origin(mask, np.random.default_rng([int(seed), _CROP_STREAM]))
        window = np.s_[top : top + self.size, left : left + self.size]
        return np.ascontiguousarray(image[window]), np.ascontiguousarray(mask[window])


_CROP_STREAM = 0xC409  # the crop's random stream of a sample seed, apart from the augmentation's


def crop_from_config(data_section) -> RandomCrop | None:
    """The :class:`RandomCrop` of the ``data`` section's ``train_crop`` and ``crop_lesion_share``, or None."""
    size = data_section.get("train_crop")
    if size is None:
        return None
    return RandomCrop(int(size), float(data_section.get("crop_lesion_share", 0.5)))


class SegmentationDataset(Dataset):
    """Images and masks from PNG files, augmented and normalised.

    Args:
        image_paths: 8-bit grey PNGs, all the same size.
        mask_paths: the matching 0/255 mask PNGs.
        normalize: turns the 8-bit image into the model's input.
        transform: the augmentation pipeline (training), or None.
        crop: a random window taken after the augmentation (training with ``data.train_crop``), or None.

    An item is requested by index (validation) or by ``(index, seed)`` as the samplers of this module yield
    them (training: the seed fixes the sample's augmentation). It is ``(image C x H x W float32, mask
    1 x H x W float32 in {0, 1})``.
    """

    def __init__(
        self,
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path],
        normalize: Normalize,
        transform: A.Compose | None = None,
        crop: RandomCrop | None = None,
    ) -> None:
        if len(image_paths) != len(mask_paths):
            raise ValueError(f"{len(image_paths)} images but {len(mask_paths)} masks")
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths)
        self.normalize = normalize
        self.transform = transform
        self.crop = crop

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        image, mask = read_png(self.image_paths[index]), read_png(self.mask_paths[index])
        image, mask = augment(self.transform, image, mask, seed)
        if self.crop is not None:
            image, mask = self.crop(image, mask, seed)
        return self.normalize(image), torch.from_numpy(mask > 127).float().unsqueeze(0)


class ImageFiles(Dataset):
    """8-bit grey PNGs as uint8 H x W tensors, for prediction (normalisation is the model's business)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(read_png(self.paths[index]))


@dataclass(frozen=True)
class SamplerContext:
    """What every sampler is given besides its config params.

    Args:
        has_mask: per training image, whether it is positive.
        seed: the run's seed; epoch ``e`` uses ``(seed, e)``.
        total_epochs: the run's epochs.
        num_replicas, rank: the distributed world (1, 0 without one).
    """

    has_mask: Sequence[bool] | np.ndarray
    seed: int
    total_epochs: int | None = None
    num_replicas: int = 1
    rank: int = 0


class EpochSampler(Sampler):
    """Base of the samplers: ``draw(epoch)`` lists the epoch's indices; this class seeds, shards and pads them.

    Args:
        context: the training images' flags, the seed and the distributed world.
    """

    def __init__(self, context: SamplerContext) -> None:
        self.has_mask = np.asarray(context.has_mask, dtype=bool)
        self.seed = int(context.seed)
        self.num_replicas = int(context.num_replicas)
        self.rank = int(context.rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def epoch_size(self) -> int:
        raise NotImplementedError

    def _epoch_draws(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        indices = self.draw(rng)
        seeds = rng.integers(0, 2**31 - 1, size=len(indices))
        total = len(self) * self.num_replicas
        padding = np.arange(total - len(indices)) % max(len(indices), 1)
        indices, seeds = np.concatenate([indices, indices[padding]]), np.concatenate([seeds, seeds[padding]])
        return indices[self.rank :: self.num_replicas], seeds[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self._epoch_draws()
        return iter(zip(indices.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return math.ceil(self.epoch_size() / self.num_replicas)


SAMPLERS: Registry[EpochSampler] = Registry("sampler")


@SAMPLERS.register("natural")
class NaturalSampler(EpochSampler):
    """Every image once per epoch, in a new order each epoch."""

    def epoch_size(self) -> int:
        return len(self.has_mask)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.has_mask))


@SAMPLERS.register("positive_share")
class PositiveShareSampler(EpochSampler):
    """A share of positive draws that moves linearly from ``start`` to ``end`` (see the module docstring).

    Args:
        start, end: positive share of the first epoch and of epoch ``epochs`` onward, in [0, 1].
        epochs: the epoch (1-based) by which ``end`` is reached; default ``total_epochs``.
        samples_per_epoch: draws per epoch; default the number of training images.
        context: as for :class:`EpochSampler`; its ``total_epochs`` is the default of ``epochs``.
    """

    def __init__(
        self,
        context: SamplerContext,
        start: float = 0.8,
        end: float = 0.4,
        epochs: int | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__(context)
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ConfigError(f"sampler positive_share: shares must be in [0, 1], got start={start}, end={end}")
        self.start, self.end = float(start), float(end)
        self.ramp_epochs = int(epochs or context.total_epochs or 1)
        self.samples = int(samples_per_epoch or len(self.has_mask))
        self.positives = np.flatnonzero(self.has_mask)
        self.negatives = np.flatnonzero(~self.has_mask)

    def epoch_size(self) -> int:
        return self.samples

    def share(self, epoch: int) -> float:
        """The positive share of (0-based) ``epoch``."""
        progress = min(epoch / max(self.ramp_epochs - 1, 1), 1.0)
        return self.start + (self.end - self.start) * progress

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        n_pos = round(self.share(self.epoch) * self.samples)
        if not len(self.positives):
            n_pos = 0
        elif not len(self.negatives):
            n_pos = self.samples
        chosen = np.concatenate([_cycle(self.positives, n_pos, rng), _cycle(self.negatives, self.samples - n_pos, rng)])
        return rng.permutation(chosen)


def _cycle(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` items of ``pool``: shuffled passes over it, so no item repeats before every item was drawn."""
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    passes = math.ceil(count / len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:count]


def build_sampler(
    block, has_mask: Sequence[bool] | np.ndarray, seed: int, total_epochs: int, num_replicas: int = 1, rank: int = 0
) -> EpochSampler:
    """The sampler of a ``sampler`` config block for the training images' ``has_mask`` flags.

    Args:
        block: the ``{name, params}`` block.
        has_mask, seed, total_epochs, num_replicas, rank: as for :class:`SamplerContext`.
    """
    return SAMPLERS.build(block, context=SamplerContext(has_mask, seed, total_epochs, num_replicas, rank))


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, **kwargs) -> DataLoader:
    """A DataLoader for training, validation and prediction, safe to fork worker processes from.

    Args:
        dataset: the images (and masks) to load.
        batch_size: items per batch.
        num_workers: worker processes (0 loads in this process). Workers are kept across epochs.
        device: where the batches go; pinned memory on a GPU.
        kwargs: passed to DataLoader (sampler, shuffle, ...).
    """
    if num_workers > 0:
        # OpenCV's thread pool is not fork-safe: a worker forked while this process has a pool (from post-processing
        # or resizing) can deadlock in its first OpenCV call. With one thread here there is no pool to inherit; the
        # workers are the parallelism.
        cv2.setNumThreads(1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        **kwargs,
    )
