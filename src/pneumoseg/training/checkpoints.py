"""Keeping a fold's k best checkpoints while it trains (the file format is :mod:`pneumoseg.modeling.checkpoints`).

The best files themselves are the truth: each holds its epoch and score, so :meth:`BestCheckpoints.rescan`
rebuilds a consistent ranking from them after a crash in the middle of re-ranking.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pneumoseg.io import write_csv
from pneumoseg.modeling.checkpoints import BEST_PATTERN, CHECKPOINTS_FILE, best_name, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

_RESCAN_PREFIX = ".rescan_"


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
        paths = [p for p in self.folder.glob("best_*.pt") if BEST_PATTERN.match(p.name)]
        for path in [*paths, *self.folder.glob(f"{_RESCAN_PREFIX}*.pt")]:  # the latter: a rescan that was killed
            meta = load_checkpoint(path)
            found.append(({"epoch": int(meta["epoch"]), "score": float(meta["score"])}, path))
        found.sort(key=lambda item: self._sort_key(item[0]))
        kept: list[tuple[dict[str, float], Path]] = []
        seen: set[float] = set()
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
        for i, (_, tmp) in enumerate(staged):
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
        rows = [
            {"rank": i + 1, "file": best_name(i + 1), "epoch": e["epoch"], "score": e["score"], "monitor": self.monitor}
            for i, e in enumerate(self.entries)
        ]
        write_csv(
            self.folder / CHECKPOINTS_FILE, pd.DataFrame(rows, columns=["rank", "file", "epoch", "score", "monitor"])
        )

    @property
    def best(self) -> dict[str, float] | None:
        return self.entries[0] if self.entries else None
