"""Training of one cross-validation fold: epochs of updates and validation, checkpoints, resume, OOF predictions.

:func:`fit_fold` writes into the fold's folder:

* ``log.csv``: one row per epoch: ``epoch, lr, train_loss, val_loss, dice[<label>]`` for each post-processing
  strategy of ``train.val_postprocess``, ``val_dice`` (the best of those), ``val_postprocess`` (which),
  ``val_dice_pos`` (mean Dice of the positive images there), ``seconds``.
* ``best_<rank>.pt`` and ``checkpoints.csv``: the ``train.keep_best`` best epochs by ``train.monitor``
  (see :mod:`pneumoseg.modeling.checkpoints`); training stops early after ``train.early_stopping`` epochs without a
  better value.
* ``last.pt``: everything needed to continue after the last finished epoch: weights, optimiser, schedule, AMP
  scaler, the epoch count (which fixes the sampler's draws and the augmentation seeds), the log so far and the
  torch RNG state. It is rewritten atomically after every epoch, so a run killed at any moment resumes from the
  last finished epoch and ends as the uninterrupted run would have.
* ``oof/``: a :class:`~pneumoseg.data.probstore.ProbabilityWriter` store of the fold's validation images predicted
  with the test recipe (:func:`write_oof`), at ``train.oof_size`` pixels; with the gate head
  (``model.params.aux_params``) also each image's gate probability (``gate.npy``), averaged over the same
  checkpoints and views.
* ``ema/`` (``train.ema``) and ``averaged/`` (``train.average_top_k``): the averaged weights' own best checkpoints,
  ``checkpoints.csv`` and ``oof/`` (see :mod:`pneumoseg.training.averaging`); the EMA's validation metrics are the
  ``ema_*`` columns of ``log.csv``.

The validation metric is the challenge's (mean per-image Dice, 1 when both masks are empty) after each
post-processing strategy of ``train.val_postprocess`` (the classes of :mod:`pneumoseg.postprocess.strategies`).

Gradient accumulation: each loss is divided by the number of batches in its accumulation group, and the
optimiser steps after every ``train.accumulation_steps`` batches and after the last, possibly shorter, group of
the epoch, so every update is the mean gradient of its group, as one larger batch would give (for a loss that
is a mean over pixels, with BatchNorm aside).

Under DistributedDataParallel the gradients are synchronised only on the last batch of a group, validation
metrics are sums over every rank's share of the validation images, and after each epoch every rank takes rank
0's BatchNorm statistics, so all ranks validate, checkpoint and finish with identical weights.

AMP (``train.amp``: fp16 with a GradScaler, or bf16) and channels_last apply on a GPU only; the CPU trains in
fp32, and with the same config and seed gives the same numbers on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pneumoseg import layout
from pneumoseg.config import to_dict
from pneumoseg.data.augment import build_augment
from pneumoseg.data.dataset import ImageFiles, PreparedData, build_sampler, crop_from_config, make_loader
from pneumoseg.data.probstore import ProbabilityWriter
from pneumoseg.data.resize import resize_probabilities
from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.metrics import dice_per_image
from pneumoseg.inference.fold_models import load_model
from pneumoseg.inference.tta import TTA, predict_with_gate
from pneumoseg.io import write_csv
from pneumoseg.logs import place
from pneumoseg.modeling.checkpoints import CHECKPOINTS_FILE, LAST_FILE, best_files, load_checkpoint, save_checkpoint
from pneumoseg.modeling.device import autocast
from pneumoseg.modeling.losses import build_training_loss
from pneumoseg.modeling.models import build_model, has_gate, split_output
from pneumoseg.modeling.normalize import normalize_from_model
from pneumoseg.modeling.optim import LRSchedule, build_optimizer, build_scheduler, metric_mode
from pneumoseg.postprocess.strategies import PostProcessor, build_postprocessor
from pneumoseg.training.averaging import average_checkpoints, build_ema, check_average_top_k, ema_decay
from pneumoseg.training.checkpoints import BestCheckpoints
from pneumoseg.training.distributed import DistContext
from pneumoseg.training.finetune import (
    check_freeze_settings,
    encoder_batchnorm_statistics,
    freeze_encoder_batchnorm,
    initial_weights_path,
    load_initial_weights,
    set_encoder_trainable,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_EMA = "ema_"  # prefix of the EMA's columns in log.csv


@dataclass(frozen=True)
class StepSettings:
    """How a :class:`Trainer` takes its optimiser steps (the ``train`` section's keys of the same names).

    Attributes:
        accumulation_steps: batches per optimiser step.
        grad_clip: maximum gradient norm, or None.
        amp: ``fp16``, ``bf16`` or None; only used on a GPU.
        channels_last: feed inputs in channels_last memory format (GPU).
        ema_decay: after each step, update an EMA of the weights with this decay (``train.ema.decay``); None:
            no EMA.
        freeze_encoder_epochs: the encoder's weights and BatchNorm statistics are fixed for this many first
            epochs (:mod:`pneumoseg.training.finetune`).
        freeze_bn: the encoder's BatchNorm layers stay in eval mode throughout.
    """

    accumulation_steps: int = 1
    grad_clip: float | None = None
    amp: str | None = None
    channels_last: bool = False
    ema_decay: float | None = None
    freeze_encoder_epochs: int = 0
    freeze_bn: bool = False

    def __post_init__(self) -> None:
        if self.accumulation_steps < 1:
            raise ConfigError(f"train.accumulation_steps must be at least 1, got {self.accumulation_steps}")
        if self.amp not in (None, "fp16", "bf16"):
            raise ConfigError(f"train.amp must be fp16, bf16 or null, not {self.amp!r}")


class Trainer:
    """A fold's network, loss, optimiser, schedule and AMP scaler, with one training epoch and one validation.

    Args:
        net: the network, already on ``ctx.device`` (and in channels_last if wanted).
        loss_fn: ``loss_fn(output, masks) -> scalar`` on the network's raw output (mask logits, or mask and gate
            logits with the gate head; see :func:`pneumoseg.modeling.losses.build_training_loss`).
        optimizer: over ``net``'s parameters.
        schedule: the learning-rate schedule.
        ctx: the distributed context; with more than one process the network is wrapped in
            DistributedDataParallel.
        steps: accumulation, clipping, AMP and memory format.
    """

    def __init__(
        self,
        net: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        ctx: DistContext = DistContext(),
        steps: StepSettings = StepSettings(),
    ) -> None:
        self.net = net
        self.ctx = ctx
        self.device = ctx.device
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(net, device_ids=device_ids) if ctx.is_distributed else net
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.schedule = schedule
        self.accumulation_steps = int(steps.accumulation_steps)
        self.grad_clip = steps.grad_clip
        self.amp = steps.amp if self.device.type == "cuda" else None
        self.channels_last = steps.channels_last and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.ema = build_ema(net, steps.ema_decay)
        check_freeze_settings(steps.freeze_encoder_epochs, ctx.is_distributed)
        self.freeze_encoder_epochs, self.freeze_bn = int(steps.freeze_encoder_epochs), bool(steps.freeze_bn)
        self.encoder_frozen = False

    @classmethod
    def from_config(
        cls, cfg: DictConfig, ctx: DistContext, updates_per_epoch: int, seed: int, initial: Path | None = None
    ) -> Trainer:
        """Build every part from the ``model``, ``loss``, ``optimizer``, ``scheduler`` and ``train`` sections;
        ``seed`` fixes the network's initial weights, unless ``initial`` (a checkpoint, ``train.init_from``)
        gives them."""
        train = cfg.train
        torch.manual_seed(seed)
        net = build_model(cfg.model)
        if initial is not None:
            load_initial_weights(net, initial, bool((train.get("init_from") or {}).get("partial", False)))
        net = net.to(ctx.device)
        channels_last = bool(train.channels_last) and ctx.device.type == "cuda"
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if train.sync_batchnorm and ctx.is_distributed:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        optimizer = build_optimizer(cfg.optimizer, net.parameters())
        schedule = build_scheduler(cfg.scheduler, optimizer, updates_per_epoch, int(train.epochs))
        steps = StepSettings(
            int(train.accumulation_steps),
            train.grad_clip,
            train.amp,
            channels_last,
            ema_decay(to_dict(train.ema) if train.ema is not None else None),
            int(train.get("freeze_encoder_epochs") or 0),
            bool(train.get("freeze_bn")),
        )
        return cls(net, build_training_loss(cfg.loss, has_gate(net)), optimizer, schedule, ctx, steps)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def start_epoch(self, epoch: int) -> None:
        """Freeze the encoder for (0-based) ``epoch`` below ``freeze_encoder_epochs``, release it after."""
        frozen = epoch < self.freeze_encoder_epochs
        if frozen != self.encoder_frozen:
            set_encoder_trainable(self.net, not frozen)
            self.encoder_frozen = frozen

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One pass over ``batches`` (an iterable with a length: a DataLoader, a list) -> mean training loss.

        The mean is over images and, in a distributed run, over every rank. A frozen encoder (:meth:`start_epoch`)
        or ``freeze_bn`` keeps the encoder's BatchNorm layers in eval mode.
        """
        self.model.train()
        if self.encoder_frozen or self.freeze_bn:
            freeze_encoder_batchnorm(self.net)
        total = len(cast(Sized, batches))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        self.optimizer.zero_grad(set_to_none=True)
        for index, (images, masks) in enumerate(batches):
            group_start = index - index % self.accumulation_steps
            group_size = min(self.accumulation_steps, total - group_start)
            update = index == group_start + group_size - 1
            # Between updates a DistributedDataParallel model skips its gradient all-reduce.
            ddp: Any = self.model
            sync = contextlib.nullcontext() if update or not self.ctx.is_distributed else ddp.no_sync()
            with sync:
                with autocast(self.device, self.amp):
                    loss = self.loss_fn(self.model(self._inputs(images)), masks.to(self.device, non_blocking=True))
                self.scaler.scale(loss / group_size).backward()
            if update:
                self._update()
            loss_sum += loss.detach().double() * len(images)
            count += len(images)
        self.ctx.broadcast_buffers(self.net)
        if self.ema is not None:
            self.ctx.broadcast_buffers(self.ema.module)
        loss_total, images_total = self.ctx.sum([loss_sum.item(), count])
        return float(loss_total / max(images_total, 1))

    def _update(self) -> None:
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), float(self.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_update()
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    def validate(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        postprocessors: Sequence[PostProcessor],
        net: nn.Module | None = None,
    ) -> dict[str, float]:
        """Validation loss and the challenge metric after each post-processing, over every rank's images, of
        ``net`` (default: the trained network; the EMA or averaged weights are validated the same way).

        The masks are drawn by the same :mod:`pneumoseg.postprocess.strategies` strategies that the threshold search and
        the submission use: without their empty-image rules, plain thresholds favour the first epochs, which
        predict nothing, over models that have started to find lesions.

        Returns:
            ``val_loss``; ``dice[<label>]`` per strategy (see :meth:`PostProcessor.label`); ``val_dice`` (the best
            of them), ``val_postprocess`` (its label) and ``val_dice_pos`` (mean Dice of the positive images
            there; NaN without positives); with the gate head also ``val_gate_accuracy``, the share of images
            whose gate probability is on the right side of 0.5 (at least 0.5 exactly when the image has a mask).
        """
        net = self.net if net is None else net
        net.eval()
        n = len(postprocessors)
        # Per rank: loss sum, image count, positive count, gate hits, then per strategy the Dice sums (all,
        # positives).
        sums = np.zeros(4 + 2 * n)
        gated = False
        with torch.inference_mode(), autocast(self.device, self.amp):
            for images, masks in batches:
                masks = masks.to(self.device, non_blocking=True)
                output = net(self._inputs(images))
                sums[0] += float(self.loss_fn(output, masks)) * len(images)
                logits, gate_logits = split_output(output)
                probs = torch.sigmoid(logits[:, 0].float()).cpu().numpy()
                gates = [None] * len(probs) if gate_logits is None else torch.sigmoid(gate_logits.float()).cpu().numpy()
                truth = masks[:, 0].cpu().numpy() > 0.5
                positive = truth.any((1, 2))
                for k, postprocess in enumerate(postprocessors):
                    dice = dice_per_image(np.stack([postprocess(p, g) for p, g in zip(probs, gates)]), truth)
                    sums[4 + k] += dice.sum()
                    sums[4 + n + k] += dice[positive].sum()
                sums[1] += len(images)
                sums[2] += positive.sum()
                if gate_logits is not None:
                    gated = True
                    sums[3] += np.count_nonzero((np.asarray(gates) >= 0.5) == positive)
        sums = self.ctx.sum(sums)
        n_images, n_positive = max(sums[1], 1.0), sums[2]
        dice_all = sums[4 : 4 + n] / n_images
        dice_pos = sums[4 + n :] / n_positive if n_positive else np.full(n, np.nan)
        best = int(np.argmax(dice_all))
        metrics: dict[str, Any] = {"val_loss": float(sums[0] / n_images)}
        metrics.update({f"dice[{p.label()}]": float(d) for p, d in zip(postprocessors, dice_all)})
        metrics.update(
            val_dice=float(dice_all[best]),
            val_postprocess=postprocessors[best].label(),
            val_dice_pos=float(dice_pos[best]),
        )
        if gated:
            metrics["val_gate_accuracy"] = float(sums[3] / n_images)
        return metrics

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def fold_seed(seed: int, fold: int) -> int:
    """The seed of one fold: independent streams per fold, all fixed by the run's seed."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def weights_digest(net: nn.Module) -> str:
    """SHA-256 of a network's state dict (names and values): equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def epochs_since_best(history: Sequence[dict], monitor: str) -> int:
    """How many epochs of ``history`` came after the best value of ``monitor``."""
    if not history:
        return 0
    scores = np.array([row[monitor] for row in history], dtype=float)
    if np.isnan(scores).all():
        return len(scores)
    best = np.nanargmin(scores) if metric_mode(monitor) == "min" else np.nanargmax(scores)
    return len(scores) - 1 - int(best)


def _loader(dataset, batch_size: int, num_workers: int, ctx: DistContext, **kwargs) -> DataLoader:
    return make_loader(dataset, batch_size, num_workers, ctx.device, **kwargs)


def train_loader(cfg: DictConfig, data: PreparedData, rows: pd.DataFrame, ctx: DistContext, seed: int) -> DataLoader:
    """The training DataLoader over ``rows`` of ``data``: augmented (and cropped with ``data.train_crop``), drawn
    by the configured sampler (this rank's share), ``train.batch_size`` images per batch. Call
    ``loader.sampler.set_epoch`` before each epoch."""
    train = cfg.train
    sampler = build_sampler(cfg.sampler, rows["has_mask"].to_numpy(), seed, int(train.epochs), ctx.world_size, ctx.rank)
    dataset = data.dataset(
        rows, normalize_from_model(to_dict(cfg.model)), build_augment(cfg.augment), crop_from_config(cfg.data)
    )
    return _loader(dataset, int(train.batch_size), int(train.num_workers), ctx, sampler=sampler)


def _clear_outputs(folder: Path, fresh: bool) -> None:
    """Remove the temporary files a killed run left behind and, for a ``fresh`` start, the fold's old outputs."""
    stale = [p for p in folder.rglob(".*") if p.is_file()]  # pneumoseg.io and ProbabilityWriter temporaries
    if fresh:
        stale += [
            *folder.glob("best_*.pt"),
            folder / LAST_FILE,
            folder / CHECKPOINTS_FILE,
            layout.fold_log_path(folder),
        ]
        shutil.rmtree(layout.oof_dir(folder), ignore_errors=True)
        for averaged in layout.CHECKPOINT_SETS[1:]:
            shutil.rmtree(layout.checkpoints_dir(folder, averaged), ignore_errors=True)
    for path in stale:
        path.unlink(missing_ok=True)


@dataclass
class _FoldRun:
    """What one fold's epochs work with: its loaders, trainer, best-checkpoint keepers (of the trained weights and,
    with ``train.ema``, of their EMA) and log so far."""

    loader: DataLoader
    val_loader: DataLoader
    trainer: Trainer
    best: BestCheckpoints
    history: list[dict]
    postprocessors: list[PostProcessor]
    checkpoint_meta: dict[str, Any]
    ema_best: BestCheckpoints | None = None


def fit_fold(
    cfg: DictConfig,
    data: PreparedData,
    fold: int,
    folder: str | Path,
    ctx: DistContext = DistContext(),
    resume: bool | str = False,
    fingerprint: str = "",
    predict_oof: bool = True,
) -> dict[str, Any]:
    """Train fold ``fold`` of ``data`` into ``folder`` and predict its validation images (see the module docstring).

    Args:
        cfg: the resolved config (sections model, loss, optimizer, scheduler, sampler, augment, train, tta).
        data: the prepared images, masks and folds at ``train.image_size``.
        fold: the fold to hold out.
        folder: the fold's output folder.
        ctx: the distributed context; only its main rank writes files.
        resume: True: continue from ``folder/last.pt`` when it exists (else start afresh, clearing old outputs);
            ``"auto"``: the same, but a ``last.pt`` of another config is set aside instead of being an error;
            False: start afresh.
        fingerprint: identifies the config; ``last.pt`` of another config is refused.
        predict_oof: write the OOF maps (of every checkpoint set); False for a phase that is not the last
            (:mod:`pneumoseg.training.phases`).

    Returns:
        The fold's summary: epochs run, best epoch and its metrics, image counts, the all-empty baseline of the
        validation images, the SHA-256 of the final weights (identical on every rank) and, with averaging,
        ``ema`` (the EMA's best epoch, its metrics, the final EMA's SHA-256) and ``averaged`` (the epochs
        averaged, the metrics, the SHA-256).

    Raises:
        ConfigError: ``last.pt`` was written for another config.
    """
    started = time.time()
    check_oof_recipe(cfg)
    folder = Path(folder)
    epochs, monitor, patience = int(cfg.train.epochs), str(cfg.train.monitor), cfg.train.early_stopping
    train_rows, val_rows = data.split(fold)
    run = _start_fold(cfg, data, fold, folder, ctx, resume, fingerprint)
    for epoch in range(len(run.history), epochs):
        if patience is not None and epochs_since_best(run.history, monitor) >= int(patience):
            log.info("fold %d: no %s improvement for %d epochs; stopping early", fold, monitor, int(patience))
            break
        with place(f"epoch {epoch + 1} of {epochs}"):
            _run_epoch(run, epoch, epochs, fold, folder, ctx, monitor, fingerprint)
    if ctx.is_main and predict_oof:
        with place("predicting its validation images (out-of-fold maps)"):
            write_oof(cfg, data, val_rows, folder, ctx)
            if run.ema_best is not None:
                write_oof(cfg, data, val_rows, run.ema_best.folder, ctx)
    ctx.barrier()
    averaging = _averaging_summary(run, monitor)
    if cfg.train.average_top_k is not None:
        averaging["averaged"] = _average_top_k(run, int(cfg.train.average_top_k), folder, ctx, monitor)
        if ctx.is_main and predict_oof:
            averaged_folder = layout.checkpoints_dir(folder, "averaged")
            write_oof(cfg, data, val_rows, averaged_folder, ctx)
        ctx.barrier()
    best_row = _best_row(run.history, monitor)
    return {
        "fold": int(fold),
        "epochs": len(run.history),
        "best_epoch": int(best_row["epoch"]),
        "best": {k: v for k, v in best_row.items() if k.startswith("val_")},
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "n_val_positive": int(val_rows["has_mask"].sum()),
        "empty_baseline": float(1.0 - val_rows["has_mask"].mean()),
        "weights_sha256": weights_digest(run.trainer.net),
        **averaging,
        "seconds": round(time.time() - started, 1),
    }


def _best_row(history: Sequence[dict], monitor: str) -> dict:
    return max(history, key=lambda r: r[monitor] if metric_mode(monitor) == "max" else -r[monitor])


def _averaging_summary(run: _FoldRun, monitor: str) -> dict[str, Any]:
    """``{"ema": {best_epoch, best, weights_sha256}}`` (from the log's ``ema_*`` columns; the digest of the final
    EMA) when the fold has an EMA, else {}."""
    ema = run.trainer.ema
    if run.ema_best is None or ema is None:
        return {}
    ema_rows = [
        {k[len(_EMA) :]: v for k, v in row.items() if k.startswith(_EMA)} | {"epoch": row["epoch"]}
        for row in run.history
    ]
    best = _best_row(ema_rows, monitor)
    return {
        "ema": {
            "best_epoch": int(best["epoch"]),
            "best": {k: v for k, v in best.items() if k.startswith("val_")},
            "weights_sha256": weights_digest(ema.module),
        }
    }


def _average_top_k(run: _FoldRun, top_k: int, folder: Path, ctx: DistContext, monitor: str) -> dict[str, Any]:
    """Average the fold's ``top_k`` best checkpoints, recompute BatchNorm statistics over the training loader
    (except the encoder's under ``train.freeze_bn``, which stay as frozen), validate, and (main rank) save the
    result as ``averaged/best_1.pt`` -> the epochs averaged, the metrics and the weights' digest (identical on every
    rank)."""
    paths = best_files(folder)[:top_k]
    net = average_checkpoints(run.trainer.net, paths)
    frozen = encoder_batchnorm_statistics(net) if run.trainer.freeze_bn else {}
    update_bn(run.loader, net, device=ctx.device)
    net.load_state_dict(frozen, strict=False)
    ctx.broadcast_buffers(net)
    metrics = run.trainer.validate(run.val_loader, run.postprocessors, net=net)
    epochs = [int(load_checkpoint(path)["epoch"]) for path in paths]
    if ctx.is_main:
        averaged_folder = layout.checkpoints_dir(folder, "averaged")
        shutil.rmtree(averaged_folder, ignore_errors=True)
        keeper = BestCheckpoints(averaged_folder, 1, metric_mode(monitor), monitor)
        # Its epoch is the last one averaged: the weights exist only once that epoch has run.
        keeper.offer(
            max(epochs),
            metrics[monitor],
            lambda: {
                **run.checkpoint_meta,
                "state_dict": net.state_dict(),
                "epoch": max(epochs),
                "score": float(metrics[monitor]),
                "averaged_epochs": epochs,
            },
        )
    ctx.barrier()
    log.info(
        "fold %s: average of epochs %s: val_dice %.4f (%s)",
        run.checkpoint_meta["fold"],
        epochs,
        metrics["val_dice"],
        metrics["val_postprocess"],
    )
    return {
        "epochs": epochs,
        **{k: v for k, v in metrics.items() if k.startswith("val_")},
        "weights_sha256": weights_digest(net),
    }


def _start_fold(
    cfg: DictConfig, data: PreparedData, fold: int, folder: Path, ctx: DistContext, resume: bool | str, fingerprint: str
) -> _FoldRun:
    """Build the fold's loaders and trainer, and restore its state from ``last.pt`` when resuming."""
    train = cfg.train
    train_rows, val_rows = data.split(fold)
    seed = fold_seed(cfg.seed, fold)
    loader = train_loader(cfg, data, train_rows, ctx, seed)
    val_rows_here = val_rows.iloc[ctx.rank :: ctx.world_size]  # metrics are summed over the ranks' shares
    val_loader = _loader(
        data.dataset(val_rows_here, normalize_from_model(to_dict(cfg.model))),
        int(train.val_batch_size),
        int(train.num_workers),
        ctx,
    )
    updates_per_epoch = math.ceil(len(loader) / int(train.accumulation_steps))
    torch.backends.cudnn.benchmark = not train.deterministic
    torch.use_deterministic_algorithms(bool(train.deterministic), warn_only=True)
    trainer = Trainer.from_config(cfg, ctx, updates_per_epoch, seed, initial_weights_path(cfg, fold, data.folds))
    monitor = str(train.monitor)
    check_average_top_k(train.average_top_k, int(train.keep_best))
    keepers = [
        BestCheckpoints(where, int(train.keep_best), metric_mode(monitor), monitor)
        for where in [folder] + [layout.checkpoints_dir(folder, "ema")] * (trainer.ema is not None)
    ]
    history = _restore(trainer, keepers, folder, ctx, fingerprint, strict=resume is True) if resume else []
    if ctx.is_main:
        _clear_outputs(folder, fresh=not history)
    ctx.barrier()
    meta = {
        "model": to_dict(cfg.model),
        "image_size": int(train.image_size),
        "fold": int(fold),
        "monitor": monitor,
        "fingerprint": fingerprint,
    }
    return _FoldRun(
        loader,
        val_loader,
        trainer,
        keepers[0],
        history,
        [build_postprocessor(block) for block in train.val_postprocess],
        meta,
        keepers[1] if len(keepers) > 1 else None,
    )


def _run_epoch(
    run: _FoldRun, epoch: int, epochs: int, fold: int, folder: Path, ctx: DistContext, monitor: str, fingerprint: str
) -> None:
    """Train and validate one epoch, then (main rank) offer its weights as a best checkpoint, log it and write
    ``last.pt``."""
    trainer = run.trainer
    epoch_start, lr = time.time(), trainer.lr
    cast(Any, run.loader.sampler).set_epoch(epoch)  # the sampler of :func:`_train_loader`
    trainer.start_epoch(epoch)
    progress = tqdm(run.loader, desc=f"fold {fold} epoch {epoch + 1}/{epochs}", leave=False, disable=not ctx.is_main)
    train_loss = trainer.train_epoch(progress)
    metrics = trainer.validate(run.val_loader, run.postprocessors)
    trainer.schedule.after_validation(metrics)
    ema_metrics = (
        {} if trainer.ema is None else trainer.validate(run.val_loader, run.postprocessors, net=trainer.ema.module)
    )
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        **metrics,
        **{_EMA + k: v for k, v in ema_metrics.items()},
        "seconds": round(time.time() - epoch_start, 2),
    }
    run.history.append(row)
    if ctx.is_main:
        rank = _offer(run.best, run, trainer.net, epoch + 1, metrics[monitor])
        if run.ema_best is not None and trainer.ema is not None:
            _offer(run.ema_best, run, trainer.ema.module, epoch + 1, ema_metrics[monitor])
        write_csv(layout.fold_log_path(folder), pd.DataFrame(run.history))
        save_checkpoint(
            folder / LAST_FILE,
            {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": fingerprint,
                "epoch": epoch + 1,
                "trainer": trainer.state_dict(),
                "history": run.history,
                "rng": torch.get_rng_state(),
            },
        )
        log.info(
            "fold %d epoch %d/%d: lr %.2e train_loss %.4f val_loss %.4f val_dice %.4f (%s) pos %.3f, %.1f s%s",
            fold,
            epoch + 1,
            epochs,
            lr,
            train_loss,
            metrics["val_loss"],
            metrics["val_dice"],
            metrics["val_postprocess"],
            metrics["val_dice_pos"],
            row["seconds"],
            f"  (best #{rank})" if rank else "",
        )
    ctx.barrier()


def _offer(keeper: BestCheckpoints, run: _FoldRun, net: nn.Module, epoch: int, score: float) -> int | None:
    """Offer ``net``'s weights after ``epoch`` to ``keeper`` -> the rank it got, or None."""
    return keeper.offer(
        epoch,
        score,
        lambda: {**run.checkpoint_meta, "state_dict": net.state_dict(), "epoch": epoch, "score": float(score)},
    )


def _restore(
    trainer: Trainer, keepers: Sequence[BestCheckpoints], folder: Path, ctx: DistContext, fingerprint: str, strict: bool
) -> list[dict]:
    """Load ``last.pt`` into ``trainer`` (and re-rank the best files of each keeper) -> the log so far; []
    without ``last.pt`` or, unless ``strict``, with a ``last.pt`` written for another config."""
    path = folder / LAST_FILE
    if not path.is_file():
        log.info("%s: nothing to resume from; starting the fold afresh", path)
        return []
    state = load_checkpoint(path)
    if state.get("fingerprint") != fingerprint:
        if not strict:
            log.info("%s was written for another config; starting the fold afresh", path)
            return []
        raise ConfigError(
            f"{path} was written for a different config (or folds); rerun without --resume to train this fold afresh"
        )
    trainer.load_state_dict(state["trainer"])
    torch.set_rng_state(state["rng"])
    if ctx.is_main:
        for keeper in keepers:
            keeper.rescan()
    log.info("%s: resuming after epoch %d", path, state["epoch"])
    return list(state["history"])


def check_oof_recipe(cfg: DictConfig) -> None:
    """Refuse, before any training, a ``predict.top_k`` that stage 05 could not load: the OOF predictions use it;
    warn when ``train.oof_size`` makes the OOF maps coarser than the maps stage 05 post-processes.

    Raises:
        ConfigError: ``predict.top_k`` below 1 or above ``train.keep_best``.
    """
    top_k, keep = int(cfg.predict.top_k), int(cfg.train.keep_best)
    if not 1 <= top_k <= keep:
        raise ConfigError(
            f"predict.top_k={top_k} must be between 1 and train.keep_best={keep}: the OOF "
            f"predictions and stage 05 average that many of the checkpoints each fold keeps"
        )
    oof_size, image_size = int(cfg.train.oof_size), int(cfg.train.image_size)
    if oof_size < image_size:
        log.warning(
            "train.oof_size=%d is below train.image_size=%d: the OOF maps are area-averaged to %d px and "
            "then brought back to the original size, while stage 05 brings the %d px output back directly; "
            "thin lesions score lower, so the searched thresholds may be off for them. Set "
            "train.oof_size=%d if the disk allows.",
            oof_size,
            image_size,
            oof_size,
            image_size,
            image_size,
        )


def write_oof(cfg: DictConfig, data: PreparedData, val_rows: pd.DataFrame, folder: Path, ctx: DistContext) -> None:
    """Predict the fold's validation images into ``folder/oof`` at ``train.oof_size``, with the test recipe.

    The recipe is stage 05's (:meth:`pneumoseg.inference.predictor.Predictor.from_experiment`): the fold's
    ``predict.top_k`` best checkpoints, the ``tta`` views and ``predict.amp``, so that stage 04 tunes the
    post-processing on the maps the submission is made of.
    """
    train = cfg.train
    models = [load_model(path, ctx.device) for path in best_files(folder)[: int(cfg.predict.top_k)]]
    ids = val_rows["ImageId"].tolist()
    images = ImageFiles([data.image_dir / f"{i}.png" for i in ids])
    loader = _loader(images, int(train.val_batch_size), int(train.num_workers), ctx)
    size = int(train.oof_size)
    tta = TTA.from_config(cfg.get("tta"))
    with ProbabilityWriter(layout.oof_dir(folder), ids, size) as writer:
        start = 0
        for batch in tqdm(loader, desc=f"OOF {folder.name}", leave=False):
            probs, gates = predict_with_gate(models, batch, tta, batch_size=len(batch), amp=cfg.predict.amp)
            writer.write(start, resize_probabilities(probs, size, size), gates)
            start += len(batch)
