"""Trained fold models, loaded for prediction: a ``best_<rank>.pt`` checkpoint rebuilt into its network, with what
is needed to feed it (:class:`FoldModel`), one file at a time (:func:`load_model`) or the best of each fold of a
training folder (:func:`load_fold_models`)::

    models = load_fold_models("output/demo/03_train", device="cpu")

Test-time augmented prediction with them is :mod:`pneumoseg.inference.tta`; the checkpoint files themselves are
:mod:`pneumoseg.modeling.checkpoints`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pneumoseg import layout
from pneumoseg.errors import DataError
from pneumoseg.modeling.checkpoints import best_files, load_checkpoint, retrain_hint
from pneumoseg.modeling.models import build_model
from pneumoseg.modeling.normalize import Normalize, normalize_from_model
from pneumoseg.stage_table import command, run_first


@dataclass
class FoldModel:
    """A trained network with what is needed to feed it.

    Attributes:
        net: the network, in eval mode on its device.
        normalize: 8-bit image -> input tensor.
        image_size: the square size it was trained at; predict at this size.
        fold, epoch, score: where the checkpoint came from (None when unknown).
        path: the checkpoint file.
    """

    net: nn.Module
    normalize: Normalize
    image_size: int
    fold: int | None = None
    epoch: int | None = None
    score: float | None = None
    path: Path | None = None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", fix: str | None = None) -> FoldModel:
    """Rebuild the network of a ``best_<rank>.pt`` checkpoint and load its weights (no download).

    Args:
        path: the checkpoint.
        device: where to put the network.
        fix: how to remake a damaged checkpoint, for the error message (default: retrain its fold).

    Raises:
        DataError: the file is missing, damaged, or is not a pneumoseg model checkpoint.
    """
    path = Path(path)
    fix = fix or retrain_hint(path)
    checkpoint = load_checkpoint(path, fix)
    if "state_dict" not in checkpoint or "model" not in checkpoint:
        raise DataError(f"{path} is not a pneumoseg model checkpoint (no 'state_dict' and 'model' entries); {fix}")
    net = build_model(checkpoint["model"], pretrained=False)
    try:
        net.load_state_dict(checkpoint["state_dict"])
        image_size = int(checkpoint["image_size"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # weights of another network, or missing
        raise DataError(
            f"{path} does not hold the weights of the network it describes ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); {fix}"
        ) from None
    device = torch.device(device)
    net.to(device).eval()
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    return FoldModel(
        net=net,
        normalize=normalize_from_model(checkpoint["model"]),
        image_size=image_size,
        fold=checkpoint.get("fold"),
        epoch=checkpoint.get("epoch"),
        score=checkpoint.get("score"),
        path=path,
    )


def load_fold_models(
    train_dir: str | os.PathLike,
    folds: Iterable[int] | None = None,
    top: int = 1,
    device: str | torch.device = "cpu",
    checkpoints: str = "best",
) -> list[FoldModel]:
    """The ``top`` best checkpoints of each fold of a training folder (``03_train`` or a SageMaker model dir).

    Args:
        train_dir: holds ``fold<k>/best_<rank>.pt``.
        folds: the folds to load; default every fold found.
        top: checkpoints per fold (best first).
        device: where to put the networks.
        checkpoints: which set of each fold (``predict.checkpoints``): ``best`` (the trained weights), ``ema`` or
            ``averaged`` (see :func:`pneumoseg.layout.checkpoints_dir`).

    Raises:
        DataError: no fold folder, or a requested fold without checkpoints.
        ConfigError: an unknown ``checkpoints``.
    """
    found = layout.fold_dirs(train_dir)
    wanted = list(found) if folds is None else list(folds)
    if not wanted:
        raise DataError(f"no fold folders (fold<k>/) in {train_dir}; {run_first('03')}")
    models: list[FoldModel] = []
    for fold in wanted:
        files = best_files(layout.checkpoints_dir(found[fold], checkpoints))[:top] if fold in found else []
        if not files:
            hint = (
                ""
                if checkpoints == "best"
                else (
                    f" (predict.checkpoints={checkpoints} needs train.ema or "
                    f"train.average_top_k set when the fold was trained)"
                )
            )
            raise DataError(
                f"fold {fold} has no {checkpoints} best_<rank>.pt checkpoint in {train_dir}; train it "
                f"first ({command('03')} --fold {fold}){hint}"
            )
        models.extend(load_model(path, device) for path in files)
    return models
