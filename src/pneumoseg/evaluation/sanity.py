"""Warnings for a model that learned nothing: scores below the all-empty baseline, or no positive prediction.

A segmentation model that predicts every image empty scores the share of empty images (the all-empty baseline:
about 0.78 on the challenge's and the demo's data) and looks good next to it; stages 04 and 05 compare their
scores with it, log a WARNING with what to try, and store the warnings in their ``done.json`` summary (key
:data:`WARNINGS_KEY`), which ``status`` and the leaderboard show.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pneumoseg.data import labels as lb

log = logging.getLogger(__name__)

WARNINGS_KEY = "warnings"
_TRY = (
    "train longer (train.epochs), check the learning rate (optimizer.params.lr) and the training curves "
    "(stage 04's oof_report.md), or make sure the training images have masks (stage 02's data_report.md)"
)


def below_baseline(name: str, score: float | None, baseline: float | None) -> str | None:
    """The warning when ``score`` is below the all-empty ``baseline``, else None.

    Args:
        name: the score as the user knows it (``"nested estimate"``, ``"test score"``).
        score: the score, or None (not measured: no warning).
        baseline: the all-empty score of the same images, or None.
    """
    if score is None or baseline is None or score >= baseline:
        return None
    return (
        f"the {name} {score:.4f} is below the all-empty baseline {baseline:.4f} (every image predicted empty): "
        f"the model has learned less than predicting nothing; {_TRY}"
    )


def search_warnings(numbers: Mapping[str, Any]) -> list[str]:
    """Stage 04's warnings on its report's numbers (``nested_score``, ``empty_baseline``)."""
    found = below_baseline("nested estimate", numbers.get("nested_score"), numbers.get("empty_baseline"))
    return [found] if found else []


def prediction_warnings(summary: Mapping[str, Any]) -> list[str]:
    """Stage 05's warnings on its summary (``positive``, ``images``, ``test_score``, ``test_empty_baseline``)."""
    found = []
    if summary.get("images") and not summary.get("positive"):
        found.append(
            f"no test image of {summary['images']} was predicted with pneumothorax: the submission is "
            f"the all-empty baseline; {_TRY}"
        )
    below = below_baseline("test score", summary.get("test_score"), summary.get("test_empty_baseline"))
    return found + ([below] if below else [])


def log_warnings(stage: str, warnings: list[str]) -> list[str]:
    """Log each of ``warnings`` as a WARNING of ``stage``; returns them (for the stage's summary)."""
    for warning in warnings:
        log.warning("%s: %s", stage, warning)
    return warnings


def empty_baseline(labels_csv) -> float:
    """The all-empty score of a label file: the share of its images with no instance (``-1`` rows only).

    Args:
        labels_csv: a run-length label CSV (the demo's ``test_labels.csv``, say).
    """
    rows = lb.read_rle_csv(labels_csv)
    has_mask = rows[lb.RLE_COLUMN].ne("-1").groupby(rows[lb.ID_COLUMN]).any()
    return float((~has_mask).mean()) if len(has_mask) else float("nan")
