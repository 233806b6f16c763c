"""Checkpoint files of a fold folder: the k best models by a validation metric, and the last training state.

* ``best_<rank>.pt`` (rank 1 = best): ``{"state_dict", "model", "image_size", "fold", "epoch", "score",
  "monitor", "fingerprint"}``; ``model`` is the config block that rebuilds the network (see
  :func:`pneumoseg.inference.fold_models.load_model`). Weights only: no optimiser state.
* ``checkpoints.csv``: ``rank, file, epoch, score, monitor``, which epoch and score each best file holds.
* ``last.pt``: the full training state for ``--resume`` (see :mod:`pneumoseg.training.trainer`).

Every file is written atomically. The best files themselves are the truth: each holds its epoch and score, so
:meth:`pneumoseg.training.checkpoints.BestCheckpoints.rescan` rebuilds a consistent ranking from them after a crash
in the middle of re-ranking.
All files load with ``torch.load(weights_only=True)``: they hold tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path
from pneumoseg.stage_table import command

log = logging.getLogger(__name__)

LAST_FILE = "last.pt"
CHECKPOINTS_FILE = "checkpoints.csv"
BEST_PATTERN = re.compile(r"^best_(\d+)\.pt$")
_FOLD_RE = re.compile(r"^fold(\d+)$")


def best_name(rank: int) -> str:
    return f"best_{rank}.pt"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def retrain_hint(path: str | os.PathLike) -> str:
    """How to remake a checkpoint of stage 03: retrain the fold its folder names."""
    match = _FOLD_RE.match(Path(path).parent.name)
    fold = match.group(1) if match else "K"
    return f"retrain its fold from scratch ({command('03')} --fold {fold} --force)"


def load_checkpoint(path: str | os.PathLike, fix: str | None = None) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; only plain data is accepted (no pickled code).

    Args:
        path: the ``.pt`` file.
        fix: how to remake the file, for the error message; default :func:`retrain_hint`.

    Raises:
        DataError: the file is missing, truncated or corrupt, holds pickled code, or is not a dict; the message
            names the file and ``fix``.
    """
    fix = fix or retrain_hint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} not found; {fix}") from None
    except Exception as exc:  # torch reports a damaged file as RuntimeError, EOFError, UnpicklingError, ...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {reason}); {fix}") from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint's dict; {fix}")
    return checkpoint


MAX_TABLE_BYTES = 1 << 20
"""Largest ``checkpoints.csv`` read (a few rows of a few dozen bytes each): a file from elsewhere (a SageMaker job's
archive, say) is refused before it costs memory."""


def best_files(folder: str | os.PathLike) -> list[Path]:
    """The ``best_<rank>.pt`` files of a fold folder, best first (by the ranks in checkpoints.csv or the names).

    Raises:
        DataError: a ``checkpoints.csv`` that is too large, not UTF-8 CSV, lacks integer ``rank`` or ``file``
            columns, or names anything but ``best_<rank>.pt`` files.
    """
    folder = Path(folder)
    table = folder / CHECKPOINTS_FILE
    if table.is_file():
        names = _ranked_names(table)
        return [folder / name for name in names if (folder / name).is_file()]
    found = [(int(m.group(1)), p) for p in folder.glob("best_*.pt") if (m := BEST_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def _ranked_names(table: Path) -> list[str]:
    """The ``file`` column of ``checkpoints.csv`` by ``rank``, each name checked (see :func:`best_files`)."""
    fix = f"{retrain_hint(table)}, or copy {table.parent} again"
    if table.stat().st_size > MAX_TABLE_BYTES:
        raise DataError(
            f"{table} has {table.stat().st_size} bytes, more than the {MAX_TABLE_BYTES} a checkpoint "
            f"table can need; {fix}"
        )
    try:
        rows = pd.read_csv(table, encoding="utf-8", dtype={"file": str})
        ranks = pd.to_numeric(rows["rank"], errors="raise")
    except (ValueError, KeyError, TypeError, pd.errors.ParserError) as exc:  # pandas' EmptyDataError is a ValueError
        raise DataError(
            f"{table} is not a checkpoint table with rank and file columns ({type(exc).__name__}: "
            f"{str(exc)[:200]}); {fix}"
        ) from None
    names = list(rows.assign(rank=ranks).sort_values("rank")["file"])
    bad = [name for name in names if not (isinstance(name, str) and BEST_PATTERN.match(name))]
    if bad:
        raise DataError(f"{table} names {bad[:3]!r}, not best_<rank>.pt files of its folder; {fix}")
    return names
