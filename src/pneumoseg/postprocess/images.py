"""The images the threshold search reads: OOF probability stores with their truth decoded from the label file at
each image's original size (an :class:`~pneumoseg.postprocess.search.ImageSource`), for stage 04 and its
benchmark."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pneumoseg.data.labels import ImageLabels
from pneumoseg.data.probstore import PROBS_FILE


@dataclass
class OofImages:
    """OOF maps and their original-size truth, in order. Holds paths and label rows only, since its parts go to
    worker processes; each part opens the stores' memory maps itself.

    Args:
        ranges: ``(store folder, first row, stop row)`` of each run of images in a probability store, in order.
        labels: each image's label rows (the truth).
        shapes: each image's original ``(rows, cols)``.
    """

    ranges: list[tuple[Path, int, int]]
    labels: list[ImageLabels]
    shapes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        row = 0
        for folder, first, stop in self.ranges:
            maps = np.load(Path(folder) / PROBS_FILE, mmap_mode="r")
            for index in range(first, stop):
                yield np.asarray(maps[index]), self.truth(row)
                row += 1

    def truth(self, row: int) -> np.ndarray:
        """The boolean truth of image ``row`` at its original size."""
        rows, cols = self.shapes[row]
        return self.labels[row].mask(int(rows), int(cols))

    def part(self, start: int, stop: int) -> "OofImages":
        """Images ``start .. stop - 1``."""
        ranges, offset = [], 0
        for folder, first, last in self.ranges:
            low, high = max(start, offset), min(stop, offset + last - first)
            if low < high:
                ranges.append((folder, first + low - offset, first + high - offset))
            offset += last - first
        return OofImages(ranges, self.labels[start:stop], self.shapes[start:stop])
