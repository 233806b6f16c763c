"""The epoch-stepped cosine schedules: torch's CosineAnnealingWarmRestarts and CosineAnnealingLR, by their
closed forms."""

import math

import pytest
import torch
from torch import nn

from pneumoseg.errors import ConfigError
from pneumoseg.modeling.optim import build_scheduler


def _lrs(block, epochs, updates_per_epoch=3):
    """The lr of each epoch under the schedule (stepped as the trainer steps it: after updates and validations)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_scheduler(block, optimizer, updates_per_epoch, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(updates_per_epoch):
            optimizer.step()
            schedule.after_update()
        schedule.after_validation({"val_dice": 0.5})
    return lrs


def _cosine(t, period, eta_min):
    return eta_min + (1 - eta_min) * 0.5 * (1 + math.cos(math.pi * t / period))


def test_warm_restarts_restart_every_T_0_epochs_then_every_T_0_times_T_mult():
    lrs = _lrs({"name": "cosine_restarts", "params": {"T_0": 4, "T_mult": 2, "eta_min": 0.1}}, 12)
    # cycles of 4 then 8 epochs, each starting from the full lr
    expected = [_cosine(t, 4, 0.1) for t in range(4)] + [_cosine(t, 8, 0.1) for t in range(8)]
    assert lrs == pytest.approx(expected)
    assert lrs[4] == pytest.approx(1.0) and lrs[3] < lrs[2]


def test_warm_restarts_with_T_mult_1_repeat_the_same_cycle():
    lrs = _lrs({"name": "cosine_restarts", "params": {"T_0": 8, "eta_min": 0.0}}, 24)
    assert lrs[8:16] == pytest.approx(lrs[:8]) and lrs[16:] == pytest.approx(lrs[:8])


def test_cosine_annealing_climbs_back_past_T_max():
    lrs = _lrs({"name": "cosine_annealing", "params": {"T_max": 8, "eta_min": 0.01}}, 17)
    assert lrs == pytest.approx([_cosine(t, 8, 0.01) for t in range(17)], rel=1e-6)
    assert lrs[8] == pytest.approx(0.01) and lrs[16] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "block",
    [
        {"name": "cosine_restarts", "params": {"T_0": 0}},
        {"name": "cosine_restarts", "params": {"T_0": 4, "T_mult": 1.5}},
        {"name": "cosine_annealing", "params": {"T_max": -1}},
    ],
)
def test_bad_cycle_lengths_are_config_errors(block):
    with pytest.raises(ConfigError, match="whole number of epochs"):
        _lrs(block, 1)
