"""Weight averaging of a fold: an exponential moving average (EMA) of the weights during training, and the
average of the fold's top-k checkpoints at its end. Both use ``torch.optim.swa_utils``.

* ``train.ema: {decay: 0.999}`` (or null): after every optimiser step the EMA is updated,
  ``ema = decay * ema + (1 - decay) * weights`` (:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`), BatchNorm
  statistics included, as timm's ``ModelEmaV3`` does. It is validated after every epoch (``ema_*`` columns of
  ``log.csv``) and has its own ``train.keep_best`` best checkpoints and OOF maps in ``fold<k>/ema/``.
* ``train.average_top_k: K`` (or null): once the fold has trained, the equal average of its ``K`` best
  checkpoints (:class:`~torch.optim.swa_utils.AveragedModel`), with BatchNorm statistics recomputed over the
  training loader (:func:`~torch.optim.swa_utils.update_bn`), since averaged weights do not fit any checkpoint's
  statistics. It is validated and saved as ``fold<k>/averaged/best_1.pt`` with its own OOF maps.

``fold<k>/ema/`` and ``fold<k>/averaged/`` are laid out like the fold folder (``best_<rank>.pt``,
``checkpoints.csv``, ``oof/``; :func:`pneumoseg.layout.checkpoints_dir`), so ``predict.checkpoints: ema`` or
``averaged`` makes stage 04 search their OOF maps and stages 05-06 predict with them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pneumoseg.errors import ConfigError
from pneumoseg.modeling.checkpoints import load_checkpoint


def ema_decay(block: Mapping[str, Any] | None) -> float | None:
    """The decay of a ``train.ema`` block (None when the block is null).

    Raises:
        ConfigError: a block without ``decay``, or a decay outside (0, 1).
    """
    if block is None:
        return None
    if "decay" not in block:
        raise ConfigError("train.ema needs a decay, e.g. train.ema={decay: 0.999}; or set train.ema=null")
    decay = float(block["decay"])
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"train.ema.decay must lie strictly between 0 and 1, got {decay}")
    return decay


def check_average_top_k(top_k: int | None, keep_best: int) -> int | None:
    """``train.average_top_k`` checked against ``train.keep_best`` (the checkpoints there are to average).

    Raises:
        ConfigError: below 1 or above ``keep_best``.
    """
    if top_k is None:
        return None
    if not 1 <= int(top_k) <= int(keep_best):
        raise ConfigError(
            f"train.average_top_k={top_k} must be between 1 and train.keep_best={keep_best} (the "
            f"best checkpoints a fold keeps); raise train.keep_best or lower train.average_top_k"
        )
    return int(top_k)


def build_ema(net: nn.Module, decay: float | None) -> AveragedModel | None:
    """An EMA copy of ``net`` (parameters and buffers) with ``decay``, or None when ``decay`` is None.

    Call ``ema.update_parameters(net)`` after each optimiser step; the first call copies the weights.
    """
    if decay is None:
        return None
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def average_checkpoints(net: nn.Module, paths: Sequence[str | os.PathLike]) -> nn.Module:
    """The equal average of the weights of the checkpoints ``paths``, in a copy of ``net`` (same architecture and
    device); its buffers are those of the last checkpoint: recompute them
    (``torch.optim.swa_utils.update_bn``) before using it.

    Raises:
        ValueError: no checkpoint given.
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    scratch = copy.deepcopy(net)
    averaged = AveragedModel(scratch)
    for path in paths:
        scratch.load_state_dict(load_checkpoint(path)["state_dict"])
        averaged.update_parameters(scratch)
    return averaged.module
