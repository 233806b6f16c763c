"""What SageMaker's automatic model tuning reads from a training job's log: one ``metric_definitions`` entry per
figure stage 03 logs (``{"Name", "Regex"}``, the first group is the number).

A tuning job takes the last value a regex matched as the job's objective, so the objective to give it is
``oof_dice``: stage 03 logs it once, after its last fold, over every held-out image of every fold. ``val_dice``,
``train_loss`` and ``val_loss`` are logged after every epoch of every fold (SageMaker plots them over time).

This module imports neither torch nor pandas: the README's snippet and the tests read it.
"""

from __future__ import annotations

import re

_NUMBER = r"(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
# The per-epoch line of pneumoseg.training.trainer: "fold 0 epoch 3/30: lr ... train_loss X val_loss Y val_dice Z".
_EPOCH = r"fold \d+ epoch \d+/\d+: .*?"

METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": "oof_dice", "Regex": r"out-of-fold val_dice " + _NUMBER},
    {"Name": "val_dice", "Regex": _EPOCH + r"\bval_dice " + _NUMBER},
    {"Name": "train_loss", "Regex": _EPOCH + r"\btrain_loss " + _NUMBER},
    {"Name": "val_loss", "Regex": _EPOCH + r"\bval_loss " + _NUMBER},
]


def oof_line(score: float, n_images: int, folds: list[int]) -> str:
    """The log line that ``oof_dice`` reads: the competition dice over every held-out image of ``folds``.

    Args:
        score: the out-of-fold dice (each fold's best epoch, weighted by its held-out images).
        n_images: how many held-out images it covers.
        folds: the folds it covers.
    """
    return f"out-of-fold val_dice {score:.4f} over {n_images} held-out images (folds {', '.join(map(str, folds))})"


def metric_values(text: str) -> dict[str, list[float]]:
    """Every value each definition finds in ``text``, in order: what SageMaker would read from the same log.

    Args:
        text: a training job's log (stdout and stderr).
    """
    return {d["Name"]: [float(v) for v in re.findall(d["Regex"], text)] for d in METRIC_DEFINITIONS}
