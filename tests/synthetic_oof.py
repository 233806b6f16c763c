"""A small synthetic experiment in the layout stage 04 reads, so its tests do not depend on stages 00-03: the
label file train-rle.csv at the images' original size (stage 00), X-rays (stage 01), truth masks and labels.csv
(stage 02), folds.csv, per-fold OOF stores and training logs (stage 03)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pneumoseg.data import rle
from pneumoseg.data.probstore import ProbabilityWriter
from pneumoseg.data.resize import resize_mask
from pneumoseg.io import write_csv, write_png


@dataclass
class ArraySource:
    """An in-memory :class:`pneumoseg.postprocess.search.ImageSource`: OOF levels and original-size truth."""

    levels: np.ndarray  # uint8 N x S x S
    truth: np.ndarray  # bool N x H x W

    def __len__(self) -> int:
        return len(self.levels)

    def __iter__(self):
        return zip(self.levels, self.truth)

    def part(self, start: int, stop: int) -> ArraySource:
        return ArraySource(self.levels[start:stop], self.truth[start:stop])


@dataclass
class SyntheticOof:
    ids: list[str]
    folds: np.ndarray  # fold of each image
    masks: np.ndarray  # truth, bool N x S x S at train.image_size
    truth: np.ndarray  # truth, bool N x O x O at the original size
    train_dir: Path
    labels_dir: Path


def write_oof_experiment(
    cfg,
    n_images: int = 30,
    oof_size: int = 32,
    seed: int = 0,
    positive_rate: float = 0.4,
    original: int = 128,
    gates: bool = False,
) -> SyntheticOof:
    """Write a synthetic experiment for ``cfg`` (its paths, ``train.image_size`` and ``folds.n_splits``), with
    images of ``original`` px.

    Positive images hold one or two discs; the OOF probabilities are the blurred truth at a random confidence
    plus noise, and some empty images get a spurious blob, so that thresholds and areas matter. ``gates``: the
    stores also get gate probabilities, higher on positive images (as a gate head's ``gate.npy``).
    """
    rng = np.random.default_rng(seed)
    size, n_folds = int(cfg.train.image_size), int(cfg.folds.n_splits)
    prepared, train_dir = Path(cfg.paths.prepared_dir), Path(cfg.paths.experiment_dir) / "03_train"
    labels_dir = prepared / "02_labels"
    ids = [f"1.2.276.0.7230010.3.1.4.8323329.{1000 + k}.1517875{k:03d}" for k in range(n_images)]
    truth = np.zeros((n_images, original, original), np.uint8)
    for k in np.flatnonzero(rng.random(n_images) < positive_rate):
        for _ in range(rng.integers(1, 3)):
            radius = int(rng.integers(original // 16, original // 5))
            centre = tuple(int(c) for c in rng.integers(radius, original - radius, 2))
            cv2.circle(truth[k], centre, radius, 1, -1)
    masks = np.stack([resize_mask(t, size) // 255 for t in truth])
    folds = np.arange(n_images) % n_folds
    areas = truth.reshape(n_images, -1).sum(1)
    write_csv(
        Path(cfg.paths.input_dir) / "train-rle.csv",
        pd.DataFrame({"ImageId": ids, "EncodedPixels": [rle.encode(t) for t in truth]}),
    )
    write_csv(
        labels_dir / "labels.csv",
        pd.DataFrame(
            {
                "ImageId": ids,
                "has_mask": (areas > 0).astype(int),
                "n_instances": (areas > 0).astype(int),
                "mask_area": areas,
                "rows": original,
                "cols": original,
            }
        ),
    )
    write_csv(
        train_dir / "folds.csv",
        pd.DataFrame(
            {"ImageId": ids, "fold": folds, "has_mask": (areas > 0).astype(int), "area_bin": np.digitize(areas, [1])}
        ),
    )
    for image_id, mask in zip(ids, masks):
        write_png(labels_dir / f"masks_{size}" / f"{image_id}.png", mask * 255)
        write_png(
            prepared / "01_convert" / f"images_{size}" / f"{image_id}.png",
            rng.integers(0, 255, (size, size), dtype=np.uint8),
        )
    for fold in range(n_folds):
        rows = np.flatnonzero(folds == fold)
        with ProbabilityWriter(train_dir / f"fold{fold}" / "oof", [ids[r] for r in rows], oof_size) as writer:
            gate = np.clip(rng.normal(0.3 + 0.4 * (areas[rows] > 0), 0.2), 0, 1) if gates else None
            writer.write(0, np.stack([_probabilities(truth[r], oof_size, rng) for r in rows]), gate)
        epochs = np.arange(1, 4)
        write_csv(
            train_dir / f"fold{fold}" / "log.csv",
            pd.DataFrame(
                {
                    "epoch": epochs,
                    "lr": 1e-3,
                    "train_loss": 1 / epochs,
                    "val_loss": 1.2 / epochs,
                    "val_dice": 0.5 + 0.1 * epochs + 0.01 * fold,
                    "seconds": 1.0,
                }
            ),
        )
    return SyntheticOof(ids, folds, masks.astype(bool), truth.astype(bool), train_dir, labels_dir)


def _probabilities(mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    truth = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    if not truth.any() and rng.random() < 0.3:
        centre = tuple(int(c) for c in rng.integers(4, size - 4, 2))
        cv2.circle(truth, centre, int(rng.integers(1, 4)), rng.uniform(0.4, 0.9), -1)
    signal = truth * rng.uniform(0.3, 1.0) + rng.random((size, size)).astype(np.float32) * 0.35
    return np.clip(cv2.GaussianBlur(signal, (5, 5), 0), 0, 1)
