"""Starting a fold from trained weights, and freezing parts of the encoder: what fine-tuning and the winners'
uptraining need.

* ``train.init_from``: the weights a fold starts from (:func:`initial_weights_path`, :func:`load_initial_weights`):
  ``{checkpoint: FILE}`` (any ``.pt`` of pneumoseg: ``best_<rank>.pt``, ``last.pt``, or a bare state dict), or
  ``{experiment: DIR, checkpoints: best}``: another experiment's folder (its ``paths.experiment_dir``), whose fold
  ``k`` (its best checkpoint of that set) starts fold ``k``; its folds must be this run's. ``partial: true`` loads
  the weights whose names and shapes match and leaves the rest as built (a new head); otherwise any missing,
  unexpected or mismatched weight is an error. The load is reported either way.
* ``train.freeze_encoder_epochs: N``: for the first N epochs the encoder's weights get no gradient and its
  BatchNorm layers keep their running statistics (as smp's ``freeze_encoder`` does); ``train.freeze_bn: true``
  keeps the encoder's BatchNorm layers in eval mode for the whole run (their statistics fixed, their affine weights
  still trained).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from pneumoseg import layout
from pneumoseg.config import to_dict
from pneumoseg.data.fold_table import read_trained_folds
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.modeling.checkpoints import best_files, load_checkpoint

log = logging.getLogger(__name__)

INIT_KEYS = {"checkpoint", "experiment", "checkpoints", "partial"}
SHOWN = 5  # key names shown per kind in a load report


def encoder_of(net: nn.Module) -> nn.Module:
    """The encoder of an smp network (its ``encoder`` attribute).

    Raises:
        ConfigError: a network without one (freezing needs to know which part is the encoder).
    """
    encoder = getattr(net, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(
            f"{type(net).__name__} has no encoder to freeze; train.freeze_encoder_epochs and "
            f"train.freeze_bn need an smp architecture"
        )
    return encoder


def set_encoder_trainable(net: nn.Module, trainable: bool) -> None:
    """Let the encoder's weights receive gradients (``trainable``) or not; a weight without a gradient is left
    alone by the optimiser (no update, no weight decay)."""
    for parameter in encoder_of(net).parameters():
        parameter.requires_grad_(trainable)


def freeze_encoder_batchnorm(net: nn.Module) -> None:
    """Put the encoder's BatchNorm layers in eval mode (call after ``net.train()``): they normalise with their
    running statistics and no longer update them."""
    for module in encoder_of(net).modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def encoder_batchnorm_statistics(net: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the running statistics of the encoder's BatchNorm layers, by their names in ``net.state_dict()``
    (to put back with ``net.load_state_dict(..., strict=False)`` after something recomputed every layer's)."""
    encoder = encoder_of(net)
    prefix = next(name for name, module in net.named_modules() if module is encoder)
    return {
        f"{prefix}.{layer}.{name}" if layer else f"{prefix}.{name}": buffer.clone()
        for layer, module in encoder.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, buffer in module.named_buffers(recurse=False)
    }


def check_freeze_settings(freeze_encoder_epochs: int, distributed: bool) -> None:
    """Refuse a negative epoch count, and a frozen encoder under torchrun (DistributedDataParallel expects every
    weight it was built with to get a gradient)."""
    if freeze_encoder_epochs < 0:
        raise ConfigError(f"train.freeze_encoder_epochs must be >= 0, got {freeze_encoder_epochs}")
    if freeze_encoder_epochs and distributed:
        raise ConfigError(
            "train.freeze_encoder_epochs needs a single process per fold; run without torchrun, "
            "or set train.freeze_encoder_epochs=0"
        )


def _init_block(cfg: DictConfig) -> dict[str, Any] | None:
    block = cfg.train.get("init_from")
    if block is None:
        return None
    block = to_dict(block) if isinstance(block, DictConfig) else dict(block)
    unknown = set(block) - INIT_KEYS
    if unknown or ("checkpoint" in block) == ("experiment" in block):
        raise ConfigError(
            f"train.init_from must be {{checkpoint: FILE}} or {{experiment: DIR, checkpoints: best}}, "
            f"with partial: true|false; got {block}"
        )
    return block


def initial_weights_path(cfg: DictConfig, fold: int, folds: pd.DataFrame) -> Path | None:
    """The checkpoint that fold ``fold`` starts from (``train.init_from``), or None to start as built.

    Args:
        cfg: the resolved config.
        fold: the fold being trained.
        folds: this run's fold table (``ImageId``, ``fold``); an experiment's must be the same.

    Raises:
        ConfigError: a malformed block, or a file or folder that is not there.
        DataError: another experiment trained on other folds.
    """
    block = _init_block(cfg)
    if block is None:
        return None
    if "checkpoint" in block:
        path = Path(str(block["checkpoint"]))
        if not path.is_file():
            raise ConfigError(f"train.init_from.checkpoint: {path} not found; give an existing .pt file")
        return path
    source = layout.train_dir_in(Path(str(block["experiment"])))
    check_same_folds(source, folds)
    folder = layout.checkpoints_dir(layout.fold_dir(source, fold), str(block.get("checkpoints") or "best"))
    found = best_files(folder)
    if not found:
        raise ConfigError(
            f"train.init_from.experiment: {folder} has no best_<rank>.pt; train that experiment's "
            f"fold {fold} first (bash run_all.sh CONFIG --to 03)"
        )
    return found[0]


def check_same_folds(source: Path, folds: pd.DataFrame) -> None:
    """Refuse a training folder whose ``folds.csv`` assigns the images to other folds than ``folds``: its fold k
    would have seen this run's fold k validation images.

    Raises:
        ConfigError: the folder has no ``folds.csv``.
        DataError: the table is unreadable, or the images or their folds differ.
    """
    path = layout.train_folds_path(source)
    if not path.is_file():
        raise ConfigError(
            f"train.init_from.experiment: {path} not found; is {source.parent} an experiment's output "
            f"folder (its paths.experiment_dir) with stage 03 run?"
        )
    theirs = read_trained_folds(source)
    mine = dict(zip(folds["ImageId"].astype(str), folds["fold"].astype(int)))
    if dict(zip(theirs["ImageId"], theirs["fold"])) != mine:
        raise DataError(
            f"train.init_from.experiment: {path} assigns the images to other folds than this run's "
            f"folds.csv; a fold would start from weights trained on its own validation images. Train "
            f"both on the same prepared data and folds, or give one file with train.init_from.checkpoint"
        )


def _state_dict(payload: Mapping[str, Any], path: Path) -> Mapping[str, torch.Tensor]:
    """The network weights of a loaded checkpoint: a best/averaged file's ``state_dict``, ``last.pt``'s trainer
    model, or the payload itself when it is a bare state dict."""
    if "state_dict" in payload:
        return payload["state_dict"]
    if isinstance(payload.get("trainer"), Mapping) and "model" in payload["trainer"]:
        return payload["trainer"]["model"]
    if payload and all(isinstance(value, torch.Tensor) for value in payload.values()):
        return payload
    raise ConfigError(
        f"train.init_from: {path} holds no network weights (no state_dict); give a best_<rank>.pt, "
        f"last.pt or a saved state dict"
    )


def load_initial_weights(net: nn.Module, path: Path, partial: bool) -> dict[str, list[str]]:
    """Load the weights of ``path`` into ``net``; see the module docstring.

    Returns:
        The load report: ``missing`` (the network's weights the file lacks), ``unexpected`` (the file's weights
        the network lacks), ``mismatched`` (in both, of other shapes), as lists of names.

    Raises:
        ConfigError: without ``partial``, any missing, unexpected or mismatched weight.
    """
    source = _state_dict(load_checkpoint(path), path)
    target = net.state_dict()
    report = {
        "missing": sorted(set(target) - set(source)),
        "unexpected": sorted(set(source) - set(target)),
        "mismatched": sorted(k for k in set(source) & set(target) if source[k].shape != target[k].shape),
    }
    text = ", ".join(
        f"{len(names)} {kind}" + (f" ({', '.join(names[:SHOWN])}{', ...' * (len(names) > SHOWN)})" if names else "")
        for kind, names in report.items()
    )
    if any(report.values()) and not partial:
        raise ConfigError(
            f"train.init_from: {path} does not fit the model: {text}. Set train.init_from.partial="
            f"true to load the matching weights only (e.g. for a new head)"
        )
    net.load_state_dict(
        {k: v for k, v in source.items() if k in target and k not in report["mismatched"]}, strict=False
    )
    log.info(
        "initial weights from %s: %d loaded; %s",
        path,
        len(target) - len(report["missing"]) - len(report["mismatched"]),
        text,
    )
    return report
