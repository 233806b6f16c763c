"""Checkpoint files of a fold folder: the k best models by a validation metric, and the last training state.

* ``best_<rank>.pt`` (rank 1 = best): ``{"state_dict", "model", "image_size", "fold", "epoch", "score",
  "monitor", "fingerprint"}``; ``model`` is the config block that rebuilds the network (see
  :func:`pneumoseg.inference.tta.load_model`). Weights only: no optimiser state.
* ``checkpoints.csv``: ``rank, file, epoch, score, monitor``, which epoch and score each best file holds.
* ``last.pt``: the full training state for ``--resume`` (see :mod:`pneumoseg.training.trainer`).

Every file is written atomically. The best files themselves are the truth: each holds its epoch and score, so
:meth:`BestCheckpoints.rescan` rebuilds a consistent ranking from them after a crash in the middle of re-ranking.
All files load with ``torch.load(weights_only=True)``: they hold tensors, numbers, strings, lists and dicts only.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path, write_csv

log = logging.getLogger(__name__)

LAST_FILE = "last.pt"
CHECKPOINTS_FILE = "checkpoints.csv"
_BEST_RE = re.compile(r"^best_(\d+)\.pt$")
_FOLD_RE = re.compile(r"^fold(\d+)$")
_RESCAN_PREFIX = ".rescan_"


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
    return f"retrain its fold from scratch (scripts/03_train.py --fold {fold} --force)"


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
        raise DataError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {reason}); {fix}") \
            from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint's dict; {fix}")
    return checkpoint


def best_files(folder: str | os.PathLike) -> list[Path]:
    """The ``best_<rank>.pt`` files of a fold folder, best first (by the ranks in checkpoints.csv or the names)."""
    folder = Path(folder)
    table = folder / CHECKPOINTS_FILE
    if table.is_file():
        rows = pd.read_csv(table).sort_values("rank")
        return [folder / name for name in rows["file"] if (folder / name).is_file()]
    found = [(int(m.group(1)), p) for p in folder.glob("best_*.pt") if (m := _BEST_RE.match(p.name))]
    return [p for _, p in sorted(found)]


class BestCheckpoints:
    """Keeps the ``keep`` best checkpoints of a fold as ``best_1.pt`` .. ``best_<keep>.pt``.

    Args:
        folder: the fold folder.
        keep: how many to keep (>= 1).
        mode: ``max`` when a higher score is better, ``min`` when lower is.
        monitor: the metric's name, recorded in ``checkpoints.csv``.

    Ties go to the earlier epoch. Offering an epoch that is already ranked (an epoch redone after a resume)
    replaces its entry.
    """

    def __init__(self, folder: str | os.PathLike, keep: int, mode: str, monitor: str) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.keep = int(keep)
        self.sign = 1.0 if mode == "max" else -1.0
        self.monitor = monitor
        self.entries: list[dict[str, float]] = []  # {"epoch", "score"}, best first, entry i in best_{i+1}.pt

    def _sort_key(self, entry: dict) -> tuple[float, int]:
        return (-self.sign * entry["score"], entry["epoch"])

    def rescan(self) -> None:
        """Rebuild the ranking from the best files on disk (after a resume), renaming them into rank order."""
        found = []
        paths = [p for p in self.folder.glob("best_*.pt") if _BEST_RE.match(p.name)]
        for path in [*paths, *self.folder.glob(f"{_RESCAN_PREFIX}*.pt")]:  # the latter: a rescan that was killed
            meta = load_checkpoint(path)
            found.append(({"epoch": int(meta["epoch"]), "score": float(meta["score"])}, path))
        found.sort(key=lambda item: self._sort_key(item[0]))
        kept, seen = [], set()
        for entry, path in found:
            if entry["epoch"] in seen or len(kept) == self.keep:
                path.unlink()
            else:
                seen.add(entry["epoch"])
                kept.append((entry, path))
        # Two passes through temporary names, so that no rename overwrites a file still to be moved; the names
        # carry the (unique) epoch, so a file left under such a name by a killed rescan keeps its own.
        staged = []
        for entry, path in kept:
            tmp = self.folder / f"{_RESCAN_PREFIX}{entry['epoch']}.pt"
            os.replace(path, tmp)
            staged.append((entry, tmp))
        for i, (entry, tmp) in enumerate(staged):
            os.replace(tmp, self.folder / best_name(i + 1))
        self.entries = [entry for entry, _ in staged]
        self._write_table()

    def would_keep(self, score: float, epoch: int) -> bool:
        others = [e for e in self.entries if e["epoch"] != epoch]
        if len(others) < self.keep:
            return True
        return self._sort_key({"score": score, "epoch": epoch}) < self._sort_key(others[-1])

    def offer(self, epoch: int, score: float, payload: Callable[[], dict[str, Any]]) -> int | None:
        """Rank epoch ``epoch`` with ``score``; if it is among the best, save ``payload()`` and return its rank.

        ``payload`` is called only when the checkpoint is kept (building it copies the weights).
        """
        if not self.would_keep(score, epoch):
            return None
        self._remove_epoch(epoch)
        entry = {"epoch": int(epoch), "score": float(score)}
        rank = sum(self._sort_key(e) < self._sort_key(entry) for e in self.entries) + 1
        if len(self.entries) == self.keep:
            (self.folder / best_name(self.keep)).unlink(missing_ok=True)
            self.entries.pop()
        for i in range(len(self.entries), rank - 1, -1):  # shift worse files down, last first
            os.replace(self.folder / best_name(i), self.folder / best_name(i + 1))
        save_checkpoint(self.folder / best_name(rank), payload())
        self.entries.insert(rank - 1, entry)
        self._write_table()
        return rank

    def _remove_epoch(self, epoch: int) -> None:
        ranks = [i for i, e in enumerate(self.entries) if e["epoch"] == epoch]
        if not ranks:
            return
        position = ranks[0]
        (self.folder / best_name(position + 1)).unlink(missing_ok=True)
        for i in range(position + 1, len(self.entries)):  # close the gap: each worse file moves up a rank
            os.replace(self.folder / best_name(i + 1), self.folder / best_name(i))
        del self.entries[position]

    def _write_table(self) -> None:
        rows = [{"rank": i + 1, "file": best_name(i + 1), "epoch": e["epoch"], "score": e["score"],
                 "monitor": self.monitor} for i, e in enumerate(self.entries)]
        write_csv(self.folder / CHECKPOINTS_FILE,
                  pd.DataFrame(rows, columns=["rank", "file", "epoch", "score", "monitor"]))

    @property
    def best(self) -> dict[str, float] | None:
        return self.entries[0] if self.entries else None
