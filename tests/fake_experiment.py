"""The outputs of stages 03 and 04 without training: tiny untrained models in stage 03's checkpoint format, and a
``thresholds.json``, for the tests of stages 05-06 and of the server; and a model package built from them.

An untrained network gives probabilities near 0.5 with some structure, so a threshold of 0.5 draws irregular,
non-empty masks: a fair test of run-length strings and of the post-processing's path through the handler.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.modeling.checkpoints import best_name, save_checkpoint
from pneumoseg.config import load_config, to_dict
from pneumoseg.io import write_csv, write_json
from pneumoseg.modeling.models import build_model
from pneumoseg.stages import package
from pneumoseg.stages.record import StageRecord

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
THRESHOLDS = {"name": "threshold", "params": {"threshold": 0.5, "min_area": 0.0}}


def write_fake_training(cfg: DictConfig, folds: Sequence[int] = (0, 1), postprocess: dict = THRESHOLDS,
                        seed: int = 0) -> list[Path]:
    """Write ``03_train/fold<k>/best_1.pt`` (an untrained ``cfg.model``) for each fold, the stage's ``folds.csv``
    and ``done.json``, and ``04_search/thresholds.json`` holding ``postprocess``; return the checkpoint paths."""
    write_csv(layout.train_folds_path(cfg),
              pd.DataFrame({"ImageId": [f"fake{fold}" for fold in folds], "fold": list(folds)}))
    paths = []
    for fold in folds:
        torch.manual_seed(seed + fold)
        net = build_model(cfg.model, pretrained=False).eval()
        path = layout.fold_dir(cfg, fold) / best_name(1)
        save_checkpoint(path, {"state_dict": net.state_dict(), "model": to_dict(cfg.model),
                               "image_size": int(cfg.train.image_size), "fold": fold, "epoch": 1, "score": 0.5,
                               "monitor": "val_dice", "fingerprint": "fake"})
        paths.append(path)
    StageRecord("03_train", layout.train_dir(cfg), cfg, ()).finish({"fake": True})
    write_json(layout.thresholds_path(cfg), postprocess)
    return paths


def make_package(root: Path, *overrides: str) -> tuple[DictConfig, Path]:
    """The tiny config with its paths under ``root``, fake stage 03-04 outputs, and stage 06 run on them:
    ``(cfg, model.tar.gz)``."""
    cfg = load_config(CONFIGS / "tiny.yaml",
                      [f"paths.input_dir={root / 'input'}", f"paths.output_root={root / 'output'}", *overrides])
    write_fake_training(cfg)
    package.run(cfg)
    return cfg, layout.package_path(cfg)
