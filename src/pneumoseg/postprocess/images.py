"""The images the threshold search reads (each an :class:`~pneumoseg.postprocess.search.ImageSource`): OOF
probability stores with their truth decoded from the label file at each image's original size (:class:`OofImages`),
for stage 04 and its benchmark, and the blend of several experiments' OOF maps (:class:`BlendedImages`), for stage
04 on an ensemble."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoseg.data.blend import blend_maps
from pneumoseg.data.labels import ImageLabels
from pneumoseg.data.probstore import PROBS_FILE, dequantize


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
        for row, levels in enumerate(self.maps()):
            yield levels, self.truth(row)

    def maps(self) -> Iterator[np.ndarray]:
        """The uint8 OOF map of every image, in order (without decoding the truth)."""
        for folder, first, stop in self.ranges:
            maps = np.load(Path(folder) / PROBS_FILE, mmap_mode="r")
            for index in range(first, stop):
                yield np.asarray(maps[index])

    def truth(self, row: int) -> np.ndarray:
        """The boolean truth of image ``row`` at its original size."""
        rows, cols = self.shapes[row]
        return self.labels[row].mask(int(rows), int(cols))

    def part(self, start: int, stop: int) -> OofImages:
        """Images ``start .. stop - 1``."""
        ranges, offset = [], 0
        for folder, first, last in self.ranges:
            low, high = max(start, offset), min(stop, offset + last - first)
            if low < high:
                ranges.append((folder, first + low - offset, first + high - offset))
            offset += last - first
        return OofImages(ranges, self.labels[start:stop], self.shapes[start:stop])


@dataclass
class BlendedImages:
    """Several experiments' OOF maps of the same images, blended per image at its original size with
    :func:`pneumoseg.data.blend.blend_maps` (each member's map dequantised and resized back there, as stage 05
    resizes each member's test map), with the truth of the first member's images.

    Args:
        members: each member's :class:`OofImages`, listing the same images in the same order (maps of any size).
        weights: one per member.

    Raises:
        ValueError: no members, a weight count that differs, or members with different image counts.
    """

    members: list[OofImages]
    weights: list[float]

    def __post_init__(self) -> None:
        if not self.members or len(self.weights) != len(self.members):
            raise ValueError(f"{len(self.members)} members for {len(self.weights)} weights")
        if len({len(m) for m in self.members}) != 1:
            raise ValueError(f"the members hold different numbers of images: {[len(m) for m in self.members]}")

    def __len__(self) -> int:
        return len(self.members[0])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        first = self.members[0]
        for row, levels in enumerate(zip(*(m.maps() for m in self.members))):
            truth = first.truth(row)
            yield blend_maps([dequantize(m) for m in levels], self.weights, *truth.shape), truth

    def part(self, start: int, stop: int) -> BlendedImages:
        """Images ``start .. stop - 1``."""
        return BlendedImages([m.part(start, stop) for m in self.members], list(self.weights))
