"""Compact on-disk store of predicted probabilities: one byte per pixel, plus the index of ImageIds.

Out-of-fold predictions of the real data (about 12,000 images at 256 px) take about 790 MB this way, and readers
stream them in chunks through a memory map, so no stage needs them all in RAM.

A store is a folder holding ``probs.npy`` (uint8, N x S x S, value = round(255 * p)) and ``ids.csv`` (ImageId in
the same order), and, for models with the image-level gate head, ``gate.npy`` (float32, N: each image's gate
probability, as predicted; small, so not quantised). :class:`ProbabilityWriter` fills temporary files and renames
them into place only on :meth:`~ProbabilityWriter.commit`, so a crash never leaves a store that looks complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path, write_csv
from pneumoseg.stage_table import command

PROBS_FILE = "probs.npy"
IDS_FILE = "ids.csv"
GATE_FILE = "gate.npy"
LEVELS = 255


def quantize(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 levels 0..255 (rounded)."""
    return np.clip(np.rint(np.asarray(probs, dtype=np.float32) * LEVELS), 0, LEVELS).astype(np.uint8)


def dequantize(levels: np.ndarray) -> np.ndarray:
    """uint8 levels -> float32 probabilities."""
    return levels.astype(np.float32) / LEVELS


class ProbabilityWriter:
    """Writes a store of ``len(image_ids)`` square probability maps of side ``size``.

    Args:
        folder: the store's folder (created).
        image_ids: the ImageIds, in the order their maps will be written.
        size: side of each map in pixels.

    Use as a context manager: the store is committed when the block exits cleanly, discarded otherwise. Gate
    probabilities are given with the maps to :meth:`write`, for every block or for none.
    """

    def __init__(self, folder: str | os.PathLike, image_ids: Sequence[str], size: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.image_ids = list(image_ids)
        self.size = int(size)
        self._tmp = self.folder / f".{PROBS_FILE}.partial"
        self._maps = np.lib.format.open_memmap(
            self._tmp, mode="w+", dtype=np.uint8, shape=(len(self.image_ids), self.size, self.size)
        )
        self._written = np.zeros(len(self.image_ids), dtype=bool)
        self._gates: np.ndarray | None = None

    def write(self, start: int, probs: np.ndarray, gates: np.ndarray | None = None) -> None:
        """Store maps ``start .. start + len(probs)``; ``probs`` is B x S x S floats in [0, 1] or uint8; ``gates``:
        their B gate probabilities (None without a gate head)."""
        block = probs if probs.dtype == np.uint8 else quantize(probs)
        if block.shape[1:] != (self.size, self.size):
            raise ValueError(f"maps must be {self.size}x{self.size}, got {block.shape[1:]}")
        if (gates is None) != (self._gates is None) and self._written.any():
            raise ValueError("gate probabilities must come with every block of maps or with none")
        if gates is not None:
            if self._gates is None:
                self._gates = np.full(len(self.image_ids), np.nan, dtype=np.float32)
            self._gates[start : start + len(block)] = np.asarray(gates, dtype=np.float32).reshape(len(block))
        self._maps[start : start + len(block)] = block
        self._written[start : start + len(block)] = True

    def commit(self) -> None:
        """Flush and move the files into place; every map must have been written."""
        if not self._written.all():
            missing = [self.image_ids[i] for i in np.flatnonzero(~self._written)[:5]]
            raise RuntimeError(f"{(~self._written).sum()} maps were never written, e.g. {missing}")
        self._maps.flush()
        del self._maps
        write_csv(self.folder / IDS_FILE, pd.DataFrame({"ImageId": self.image_ids}))
        gate_path = self.folder / GATE_FILE
        if self._gates is None:
            gate_path.unlink(missing_ok=True)  # a previous run's gate must not pass for this one's
        else:
            with atomic_path(gate_path) as tmp:
                np.save(tmp, self._gates)
        os.replace(self._tmp, self.folder / PROBS_FILE)

    def discard(self) -> None:
        self._maps = None  # type: ignore[assignment]  # drops the memmap: this writer is done
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ProbabilityWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class ProbabilityStore:
    """Read access to a committed store, memory-mapped.

    Args:
        folder: a folder written by :class:`ProbabilityWriter`.

    Raises:
        DataError: the folder has no complete store, or its two files disagree.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        probs_path, ids_path = self.folder / PROBS_FILE, self.folder / IDS_FILE
        if not probs_path.is_file() or not ids_path.is_file():
            raise DataError(
                f"no complete probability store in {self.folder} (expected {PROBS_FILE} and "
                f"{IDS_FILE}); rerun the stage that writes it"
            )
        self.maps = np.load(probs_path, mmap_mode="r")
        self.ids = pd.read_csv(ids_path, dtype=str)["ImageId"].tolist()
        if self.maps.ndim != 3 or len(self.ids) != self.maps.shape[0]:
            raise DataError(
                f"probability store {self.folder} is inconsistent: {len(self.ids)} ImageIds for maps "
                f"of shape {self.maps.shape}; rerun the stage that writes it"
            )
        self.size = int(self.maps.shape[1]) if self.maps.size else 0
        self.gates = self._read_gates(self.folder / GATE_FILE)

    def _read_gates(self, path: Path) -> np.ndarray | None:
        """The store's gate probabilities (float32, one per image), or None when it has none."""
        if not path.is_file():
            return None
        fix = f"rerun the stage that writes it ({command('03')} --force for OOF predictions)"
        try:
            gates = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is not a NumPy array file ({exc}); {fix}") from None
        if gates.shape != (len(self.ids),) or gates.dtype != np.float32 or not np.all((gates >= 0) & (gates <= 1)):
            raise DataError(
                f"{path} must hold {len(self.ids)} float32 gate probabilities in [0, 1] (one per ImageId "
                f"of {IDS_FILE}), got {gates.dtype} {gates.shape}; {fix}"
            )
        return gates

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, chunk_size: int = 256) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield ``(image_ids, uint8 maps)`` blocks of at most ``chunk_size`` images, read from disk lazily."""
        for start in range(0, len(self.ids), chunk_size):
            stop = min(start + chunk_size, len(self.ids))
            yield self.ids[start:stop], np.asarray(self.maps[start:stop])
