"""Untrained fold models saved the way stage 03 saves them, and the rest of an experiment that stage 05 reads, so
that the prediction tests need no training."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from pneumoseg import layout
from pneumoseg.modeling.checkpoints import best_name, save_checkpoint
from pneumoseg.config import to_dict
from pneumoseg.io import write_csv, write_json, write_text
from pneumoseg.modeling.models import build_model
from pneumoseg.data.rle import EMPTY, encode
from pneumoseg.stages.record import DONE_FILE
from synthetic import make_case, write_prepared


def write_fold_checkpoints(train_dir: str | Path, model_block: dict, image_size: int, folds: Sequence[int],
                           per_fold: int = 1, seed: int = 0) -> list[Path]:
    """Save ``per_fold`` randomly initialised models per fold as ``fold<k>/best_<rank>.pt``; return the files."""
    written = []
    for fold in folds:
        for rank in range(1, per_fold + 1):
            torch.manual_seed(seed + 100 * fold + rank)
            net = build_model(model_block, pretrained=False)
            path = layout.fold_dir(train_dir, fold) / best_name(rank)
            save_checkpoint(path, {"state_dict": net.state_dict(), "model": model_block, "image_size": image_size,
                                   "fold": fold, "epoch": rank, "score": 0.5 / rank, "monitor": "val_dice"})
            written.append(path)
    return written


def write_experiment(cfg, n_test: int = 6, per_fold: int = 1, original_size: int = 96, seed: int = 0) -> pd.DataFrame:
    """Everything stage 05 reads for ``cfg``: stages 01-02 (a few training images and ``n_test`` test images of
    ``original_size`` px), stage 03 (untrained checkpoints of every fold, folds.csv, done.json), stage 04
    (thresholds.json, oof_report.json) and the demo's held-out ``test_labels.csv`` (stage-1 form).

    Returns:
        The test list, ImageId, rows, cols.
    """
    size, n_folds = int(cfg.train.image_size), int(cfg.folds.n_splits)
    folds = write_prepared(cfg.paths.prepared_dir, n_images=2 * n_folds, sizes=(size,), n_folds=n_folds,
                           n_test=n_test, seed=seed)
    test = pd.read_csv(layout.test_images_path(cfg), dtype={"ImageId": str})
    test[["rows", "cols"]] = original_size
    write_csv(layout.test_images_path(cfg), test)

    write_csv(layout.train_folds_path(cfg), folds)
    write_fold_checkpoints(layout.train_dir(cfg), to_dict(cfg.model), size, range(n_folds), per_fold, seed)
    write_json(layout.train_dir(cfg) / DONE_FILE, {"stage": "03_train", "fingerprint": "synthetic"})
    write_json(layout.thresholds_path(cfg),
               {"name": "threshold", "params": {"threshold": 0.5, "min_area": 0}, "oof_score": 0.75})
    write_json(layout.oof_report_path(cfg), {"oof_score": 0.75})

    rng = np.random.default_rng(seed + 1)
    lines = ["ImageId, EncodedPixels"]
    for image_id in test["ImageId"]:
        _, mask = make_case(rng, original_size, positive=bool(rng.random() < 0.5))
        lines.append(f"{image_id}, {encode(mask) if mask.any() else EMPTY}")
    write_text(Path(cfg.paths.input_dir) / "test_labels.csv", "\n".join(lines) + "\n")
    return test
