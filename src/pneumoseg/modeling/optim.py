"""Optimisers and learning-rate schedules from config blocks.

``optimizer: {name, params}``: ``adam``, ``adamw`` or ``sgd`` with torch's parameters (``lr``, ``weight_decay``, ...).

``scheduler: {name, params}``:

* ``cosine``: linear warm-up over ``warmup_epochs`` (may be fractional) from ``warmup_start`` x lr, then a cosine
  from lr down to ``min_lr_ratio`` x lr at the end of the last epoch; stepped after every optimiser step, so the
  schedule spans exactly the run's budget of updates.
* ``plateau``: ReduceLROnPlateau on a validation metric (``monitor``: ``val_loss`` by default; ``factor``,
  ``patience``, ``min_lr``), stepped after each validation.
* ``cosine_restarts``: torch's CosineAnnealingWarmRestarts: a cosine from lr down to ``eta_min`` over ``T_0``
  epochs, then again from lr over ``T_0 * T_mult`` epochs, and so on; stepped after each epoch.
* ``cosine_annealing``: torch's CosineAnnealingLR (``T_max`` epochs, ``eta_min``), stepped after each epoch: past
  ``T_max`` the cosine goes on, so the lr climbs back to lr over the next ``T_max`` epochs (the 4th place's
  schedule, ``T_max`` 8 over 60 epochs).
* ``constant``: the optimiser's lr throughout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, LambdaLR, ReduceLROnPlateau

from pneumoseg.errors import ConfigError
from pneumoseg.registry import Registry

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")
OPTIMIZERS.add("adam", torch.optim.Adam)
OPTIMIZERS.add("adamw", torch.optim.AdamW)
OPTIMIZERS.add("sgd", torch.optim.SGD)


def metric_mode(name: str) -> Literal["min", "max"]:
    """``min`` for a loss, ``max`` for a score: which way a monitored metric improves."""
    return "min" if "loss" in name else "max"


class LRSchedule:
    """A torch scheduler and when it steps.

    Args:
        scheduler: the torch scheduler.
        per_update: True steps after every optimiser step, False after every validation.
        monitor: for metric-driven schedulers, the validation metric passed to ``step``.
    """

    def __init__(self, scheduler: Any, per_update: bool, monitor: str | None = None) -> None:
        self.scheduler = scheduler
        self.per_update = per_update
        self.monitor = monitor

    def after_update(self) -> None:
        if self.per_update:
            self.scheduler.step()

    def after_validation(self, metrics: dict[str, float]) -> None:
        if self.per_update:
            return
        if self.monitor is None:
            self.scheduler.step()
        elif self.monitor not in metrics:
            raise ConfigError(
                f"scheduler monitor {self.monitor!r} is not a validation metric; known: {sorted(metrics)}"
            )
        else:
            self.scheduler.step(metrics[self.monitor])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


@dataclass(frozen=True)
class UpdateBudget:
    """The run a schedule spans: ``epochs`` x ``updates_per_epoch`` optimiser steps."""

    updates_per_epoch: int
    epochs: int


SCHEDULERS: Registry[LRSchedule] = Registry("scheduler")


@SCHEDULERS.register("cosine")
def cosine(
    optimizer: Optimizer,
    budget: UpdateBudget,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.01,
    min_lr_ratio: float = 0.0,
) -> LRSchedule:
    total = max(budget.updates_per_epoch * budget.epochs, 1)
    warmup = min(int(round(warmup_epochs * budget.updates_per_epoch)), total - 1)

    def factor(update: int) -> float:
        if update < warmup:
            return warmup_start + (1.0 - warmup_start) * update / warmup
        progress = min((update - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LRSchedule(LambdaLR(optimizer, factor), per_update=True)


@SCHEDULERS.register("plateau")
def plateau(
    optimizer: Optimizer,
    budget: UpdateBudget,
    monitor: str = "val_loss",
    factor: float = 0.5,
    patience: int = 3,
    min_lr: float = 0.0,
) -> LRSchedule:
    scheduler = ReduceLROnPlateau(optimizer, mode=metric_mode(monitor), factor=factor, patience=patience, min_lr=min_lr)
    return LRSchedule(scheduler, per_update=False, monitor=monitor)


def _check_epochs(name: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"scheduler {name}: {key} must be a whole number of epochs >= 1, got {value!r}")


@SCHEDULERS.register("cosine_restarts")
def cosine_restarts(
    optimizer: Optimizer, budget: UpdateBudget, T_0: int = 10, T_mult: int = 1, eta_min: float = 0.0
) -> LRSchedule:
    """torch's CosineAnnealingWarmRestarts, ``T_0`` (the first cycle) in epochs, each later cycle ``T_mult`` times
    the one before, down to ``eta_min``; stepped after each epoch's validation."""
    _check_epochs("cosine_restarts", T_0=T_0, T_mult=T_mult)
    return LRSchedule(CosineAnnealingWarmRestarts(optimizer, T_0=T_0, T_mult=T_mult, eta_min=eta_min), per_update=False)


@SCHEDULERS.register("cosine_annealing")
def cosine_annealing(optimizer: Optimizer, budget: UpdateBudget, T_max: int = 10, eta_min: float = 0.0) -> LRSchedule:
    """torch's CosineAnnealingLR, ``T_max`` in epochs, down to ``eta_min`` (and back up past ``T_max``); stepped
    after each epoch's validation."""
    _check_epochs("cosine_annealing", T_max=T_max)
    return LRSchedule(CosineAnnealingLR(optimizer, T_max=T_max, eta_min=eta_min), per_update=False)


@SCHEDULERS.register("constant")
def constant(optimizer: Optimizer, budget: UpdateBudget) -> LRSchedule:
    return LRSchedule(LambdaLR(optimizer, lambda update: 1.0), per_update=True)


def build_optimizer(block, parameters: Iterable[torch.nn.Parameter]) -> Optimizer:
    """The optimiser of an ``optimizer`` config block over ``parameters``."""
    return OPTIMIZERS.build(block, params=parameters)


def build_scheduler(block, optimizer: Optimizer, updates_per_epoch: int, epochs: int) -> LRSchedule:
    """The schedule of a ``scheduler`` config block for a run of ``epochs`` x ``updates_per_epoch`` updates."""
    return SCHEDULERS.build(block, optimizer=optimizer, budget=UpdateBudget(updates_per_epoch, epochs))
