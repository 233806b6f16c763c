"""A tiny prepared dataset in the layout of stages 01 and 02, for the training tests.

Each image is smooth noise; a positive image has a bright disc, which is also its mask. That is easy enough for a
tiny network to start learning within an epoch, and needs none of the other stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pneumoseg import layout
from pneumoseg.io import write_csv, write_png


def make_case(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit image, 0/255 mask) of one synthetic case at ``size`` px."""
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 16)
    image = 90 + 40 * noise / (np.abs(noise).max() + 1e-6) + rng.normal(0, 6, (size, size))
    mask = np.zeros((size, size), np.uint8)
    if positive:
        radius = int(rng.integers(size // 10, size // 5))
        centre = tuple(int(c) for c in rng.integers(radius, size - radius, 2))
        cv2.circle(mask, centre, radius, 255, -1)
        image = image + (mask > 0) * 70.0
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_prepared(
    prepared_dir: str | Path,
    n_images: int = 24,
    sizes: Sequence[int] = (64,),
    n_folds: int = 2,
    positive_rate: float = 0.5,
    n_test: int = 4,
    seed: int = 0,
) -> pd.DataFrame:
    """Write ``01_convert/`` and ``02_labels/`` under ``prepared_dir``; return the folds table.

    Folds alternate over the images so that each fold gets a share of positives.
    """
    prepared_dir = Path(prepared_dir)
    rng = np.random.default_rng(seed)
    n_pos = round(positive_rate * n_images)
    has_mask = np.zeros(n_images, bool)
    has_mask[:n_pos] = True
    train_ids = [f"1.2.276.0.7230010.3.1.4.{seed}.{i}" for i in range(n_images)]
    test_ids = [f"1.2.276.0.7230010.3.1.4.{seed}.test{i}" for i in range(n_test)]
    areas = []
    for image_id, positive in zip(train_ids + test_ids, [*has_mask, *([False] * n_test)]):
        image, mask = make_case(rng, max(sizes), positive)
        areas.append(int((mask > 0).sum()))
        for size in sizes:
            small_image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            write_png(layout.images_dir(prepared_dir, size) / f"{image_id}.png", small_image)
            if image_id in train_ids:
                small_mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
                write_png(layout.masks_dir(prepared_dir, size) / f"{image_id}.png", small_mask)
    side = max(sizes)
    write_csv(
        layout.metadata_path(prepared_dir),
        pd.DataFrame(
            {
                "ImageId": train_ids + test_ids,
                "source_path": [f"{i}.dcm" for i in train_ids + test_ids],
                "rows": side,
                "cols": side,
                "sex": "M",
                "age": 50,
                "view": "PA",
            }
        ),
    )
    labels = pd.DataFrame(
        {
            "ImageId": train_ids,
            "has_mask": has_mask,
            "n_instances": has_mask.astype(int),
            "mask_area": areas[:n_images],
            "rows": side,
            "cols": side,
        }
    )
    write_csv(layout.labels_path(prepared_dir), labels)
    folds = pd.DataFrame(
        {
            "ImageId": train_ids,
            "fold": np.arange(n_images) % n_folds,
            "has_mask": has_mask,
            "area_bin": has_mask.astype(int),
        }
    )
    write_csv(layout.folds_path(prepared_dir), folds)
    write_csv(layout.test_images_path(prepared_dir), pd.DataFrame({"ImageId": test_ids, "rows": side, "cols": side}))
    return folds
