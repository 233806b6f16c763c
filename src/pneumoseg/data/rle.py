"""The one run-length codec of pneumoseg: labels, submissions and the server all use it.

Masks are flattened column-major (pixel index = col * height + row), as the challenge did. Two string forms:

* ``"relative"`` (the challenge's): pairs ``gap length``. The first gap is the 0-based index where the first
  run starts; every later gap counts the background pixels since the end of the previous run.
  A 4x4 mask with pixels (row, col) = (1,1), (2,1), (0,2), (3,3) encodes to ``"5 2 1 1 6 1"``.
* ``"absolute"``: pairs ``start length`` with 1-based starts (the usual Kaggle form).

An empty mask is ``"-1"`` in both forms. Everything is vectorised: encoding costs two quick scans of the
image plus work in proportion to the lesion's bounding box; decoding costs the output array plus work in
proportion to the mask pixels. ``benchmarks/bench_rle.py`` measures both against the challenge's own codec.
"""

from __future__ import annotations

import numpy as np

from pneumoseg.errors import DataError

EMPTY = "-1"
FORMATS = ("relative", "absolute")


class RLEError(DataError):
    """A run-length string that is not valid for the image it is meant for."""


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based column-major start indices and lengths of the runs of non-zero pixels in a 2-D mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (height x width), got shape {mask.shape}")
    if mask.dtype != bool:
        mask = mask != 0
    height = mask.shape[0]
    used_cols = np.flatnonzero(mask.any(axis=0))
    if used_cols.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    used_rows = np.flatnonzero(mask.any(axis=1))
    top, left = int(used_rows[0]), int(used_cols[0])
    box = mask[top : used_rows[-1] + 1, left : used_cols[-1] + 1]
    # Runs are found down the columns of the lesion's bounding box, in row-major memory order: comparing each
    # row with the one above is a fast contiguous pass, where walking the transposed mask would be strided
    # and several times slower. Only the few change points are then put into column-major order.
    change_rows, change_cols = np.divmod(np.flatnonzero(box[1:] != box[:-1]), box.shape[1])
    change_rows += 1
    rises = box[change_rows, change_cols]
    top_cols, bottom_cols = np.flatnonzero(box[0]), np.flatnonzero(box[-1])
    start_rows = np.concatenate((change_rows[rises], np.zeros(top_cols.size, np.int64)))
    start_cols = np.concatenate((change_cols[rises], top_cols))
    end_rows = np.concatenate((change_rows[~rises], np.full(bottom_cols.size, box.shape[0], np.int64)))
    end_cols = np.concatenate((change_cols[~rises], bottom_cols))
    starts = np.sort((start_cols + left) * height + start_rows + top)
    ends = np.sort((end_cols + left) * height + end_rows + top)
    # A run reaching the bottom of a column goes on at the top of the next one in the flattened order.
    joined = starts[1:] == ends[:-1]
    starts = np.concatenate((starts[:1], starts[1:][~joined]))
    ends = np.concatenate((ends[:-1][~joined], ends[-1:]))
    return starts, ends - starts


def encode(mask: np.ndarray, fmt: str = "relative") -> str:
    """Encode a 2-D mask (any dtype; non-zero is foreground) as a run-length string.

    Args:
        mask: height x width array.
        fmt: ``"relative"`` (the challenge's form) or ``"absolute"`` (1-based starts).

    Returns:
        Space-separated pairs, or ``"-1"`` when the mask is empty.
    """
    _check_format(fmt)
    starts, lengths = runs(np.asarray(mask))
    if starts.size == 0:
        return EMPTY
    if fmt == "relative":
        firsts = starts.copy()
        firsts[1:] = starts[1:] - (starts[:-1] + lengths[:-1])
    else:
        firsts = starts + 1
    pairs = np.empty(2 * starts.size, np.int64)
    pairs[0::2] = firsts
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


def parse(rle: str, height: int, width: int, fmt: str = "relative") -> tuple[np.ndarray, np.ndarray]:
    """Validate a run-length string and return its 0-based column-major starts and lengths.

    Raises:
        RLEError: not integers, an odd count, a negative gap, a run of length < 1, runs out of order or
            overlapping (absolute form), or a run beyond the ``height * width`` pixels of the image.
    """
    _check_format(fmt)
    text = str(rle).strip()
    if text in (EMPTY, ""):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    try:
        values = np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        raise RLEError(f"run-length string has a token that is not an integer: {text[:60]!r}") from None
    if values.size % 2:
        raise RLEError(f"run-length string has an odd number of values ({values.size}); it must be pairs")
    total = height * width
    # No valid gap, start or length exceeds the pixel count; rejecting larger values first also keeps the
    # sums below far from int64 overflow, which would otherwise wrap to small in-bounds indices.
    if (values > total).any():
        raise RLEError(f"value {int(values[values > total][0])} is beyond the {height}x{width} image ({total} pixels)")
    firsts, lengths = values[0::2], values[1::2]
    if (lengths < 1).any():
        raise RLEError(f"run length {int(lengths[lengths < 1][0])} is not positive")
    if fmt == "relative":
        if (firsts < 0).any():
            raise RLEError(f"gap {int(firsts[firsts < 0][0])} is negative")
        starts = np.cumsum(firsts) + np.concatenate(([0], np.cumsum(lengths[:-1])))
    else:
        starts = firsts - 1
        if starts[0] < 0:
            raise RLEError(f"absolute start {int(firsts[0])} is below 1")
        if (starts[1:] < starts[:-1] + lengths[:-1]).any():
            raise RLEError("absolute runs are out of order or overlap")
    last_end = int(starts[-1] + lengths[-1])
    if last_end > total:
        raise RLEError(f"runs reach pixel {last_end}, beyond the {height}x{width} image ({total} pixels)")
    return starts, lengths


def decode(rle: str, height: int, width: int, fmt: str = "relative") -> np.ndarray:
    """Decode a run-length string into a ``height x width`` boolean mask.

    Args:
        rle: space-separated pairs, or ``"-1"`` / empty for an empty mask. Surrounding spaces are ignored
            (the stage-1 label file has a leading space).
        height, width: the image's size in pixels.
        fmt: ``"relative"`` or ``"absolute"``.

    Raises:
        RLEError: see :func:`parse`.
    """
    starts, lengths = parse(rle, height, width, fmt)
    mask = np.zeros((height, width), dtype=bool)
    if starts.size:
        flat = _run_indices(starts, lengths)
        mask[flat % height, flat // height] = True
    return mask


def _run_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Every pixel index covered by the runs, without a Python loop: a ramp that restarts at each run."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + offsets
