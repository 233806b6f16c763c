"""A fake experiment without training, for the tests of stages 05-06, the predictor and the server: tiny
untrained models in stage 03's checkpoint format, stage 03's ``folds.csv`` and ``done.json``, stage 04's
``thresholds.json``; with :func:`write_experiment` also stages 01-02 and the demo's held-out test labels; with
:func:`make_package` stage 06's model package built from them.

An untrained network gives probabilities near 0.5 with some structure, so a threshold of 0.5 draws irregular,
non-empty masks: a fair test of run-length strings and of the post-processing's path through the handler.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.config import load_config, to_dict
from pneumoseg.data.rle import EMPTY, encode
from pneumoseg.io import write_csv, write_json, write_text
from pneumoseg.modeling.checkpoints import best_name, save_checkpoint
from pneumoseg.modeling.models import build_model
from pneumoseg.stages import package
from pneumoseg.stages.record import StageRecord
from synthetic import make_case, write_prepared

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
THRESHOLDS = {"name": "threshold", "params": {"threshold": 0.5, "min_area": 0.0}}
OOF_SCORE = 0.75


def write_fake_training(
    cfg: DictConfig, folds: Sequence[int] = (0, 1), postprocess: dict = THRESHOLDS, seed: int = 0, per_fold: int = 1
) -> list[Path]:
    """Write stage 03's and 04's outputs for ``cfg`` as if it had trained; return the checkpoint paths.

    Args:
        cfg: the resolved config; its ``model`` is built untrained.
        folds: the folds to write ``03_train/fold<k>/best_<rank>.pt`` for; ``folds.csv`` gets one fake image each.
        postprocess: the block written to ``04_search/thresholds.json``.
        seed: the seed of the first model (each model gets its own).
        per_fold: checkpoints per fold, ranks 1 to ``per_fold``.
    """
    write_csv(
        layout.train_folds_path(cfg), pd.DataFrame({"ImageId": [f"fake{fold}" for fold in folds], "fold": list(folds)})
    )
    paths = []
    for fold in folds:
        for rank in range(1, per_fold + 1):
            torch.manual_seed(seed + 100 * fold + rank)
            net = build_model(cfg.model, pretrained=False)
            path = layout.fold_dir(cfg, fold) / best_name(rank)
            save_checkpoint(
                path,
                {
                    "state_dict": net.state_dict(),
                    "model": to_dict(cfg.model),
                    "image_size": int(cfg.train.image_size),
                    "fold": fold,
                    "epoch": rank,
                    "score": 0.5 / rank,
                    "monitor": "val_dice",
                    "fingerprint": "fake",
                },
            )
            paths.append(path)
    StageRecord("03_train", layout.train_dir(cfg), cfg, ()).finish({"fake": True})
    write_json(layout.thresholds_path(cfg), postprocess)
    return paths


def write_experiment(
    cfg: DictConfig, n_test: int = 6, per_fold: int = 1, original_size: int = 96, seed: int = 0
) -> pd.DataFrame:
    """Everything stage 05 reads for ``cfg``: stages 01-02 (a few training images and ``n_test`` test images of
    ``original_size`` px), stages 03-04 (:func:`write_fake_training` for every fold, the real ``folds.csv``,
    ``oof_report.json``) and the demo's held-out ``test_labels.csv`` (stage-1 form).

    Args:
        cfg: the resolved config; its paths say where everything goes.
        n_test: test images.
        per_fold: checkpoints per fold.
        original_size: the test images' original size (rows = cols) in the test list and the labels.
        seed: seeds the images, the models and the labels.

    Returns:
        The test list, ImageId, rows, cols.
    """
    size, n_folds = int(cfg.train.image_size), int(cfg.folds.n_splits)
    folds = write_prepared(
        cfg.paths.prepared_dir, n_images=2 * n_folds, sizes=(size,), n_folds=n_folds, n_test=n_test, seed=seed
    )
    test = pd.read_csv(layout.test_images_path(cfg), dtype={"ImageId": str})
    test[["rows", "cols"]] = original_size
    write_csv(layout.test_images_path(cfg), test)

    write_fake_training(cfg, range(n_folds), {**THRESHOLDS, "oof_score": OOF_SCORE}, seed, per_fold)
    write_csv(layout.train_folds_path(cfg), folds)
    write_json(layout.oof_report_path(cfg), {"oof_score": OOF_SCORE})

    rng = np.random.default_rng(seed + 1)
    lines = ["ImageId, EncodedPixels"]
    for image_id in test["ImageId"]:
        _, mask = make_case(rng, original_size, positive=bool(rng.random() < 0.5))
        lines.append(f"{image_id}, {encode(mask) if mask.any() else EMPTY}")
    write_text(Path(cfg.paths.input_dir) / "test_labels.csv", "\n".join(lines) + "\n")
    return test


def make_package(root: Path, *overrides: str) -> tuple[DictConfig, Path]:
    """The tiny config with its paths under ``root``, fake stage 03-04 outputs, and stage 06 run on them:
    ``(cfg, model.tar.gz)``."""
    cfg = load_config(
        CONFIGS / "tiny.yaml", [f"paths.input_dir={root / 'input'}", f"paths.output_root={root / 'output'}", *overrides]
    )
    write_fake_training(cfg)
    package.run(cfg)
    return cfg, layout.package_path(cfg)
