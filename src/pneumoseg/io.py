"""Crash-safe file writing: every output is written to a temporary file beside it, then renamed.

A reader therefore sees either the old complete file or the new complete file, never half of one, and a
stage killed mid-write leaves only a ``.tmp`` file that the next run overwrites.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import cv2
import numpy as np
import pandas as pd

from pneumoseg.errors import DataError


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# mkstemp creates files readable by their owner only; outputs get the usual mode instead, so that a model
# package or a report stays readable by other users (a serving container's non-root user, say).
_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` if the block succeeds.

    Args:
        path: final location. Its parent folders are created.

    The temporary name keeps the target's suffix so that writers which pick a format from the suffix
    (OpenCV, numpy, pandas) still work.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` only when the block exits cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, missing: str, invalid_fix: str) -> Any:
    """Parse a JSON file that a stage wrote.

    Args:
        path: the file.
        missing: the whole message when the file does not exist (what it is, and how to make it).
        invalid_fix: how to remake the file, appended to the message when it is not valid JSON.

    Raises:
        DataError: the file is missing or is not valid JSON.
    """
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(missing) from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {invalid_fix}") from None


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an 8-bit grey (HxW) or colour (HxWx3, RGB) image as PNG, atomically."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise DataError(f"could not write PNG {path}: OpenCV refused an array of shape {image.shape}")


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit grey PNG as an HxW uint8 array; a missing or unreadable file is a DataError."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError(f"cannot read image {path}: missing or not a PNG. Rerun the stage that writes it.")
    return image


def content_hash(*paths: Path, length: int | None = 16) -> str:
    """The sha256 of the files' bytes, one after the other, read in blocks (large checkpoints stay on disk).

    Args:
        paths: the files, in the order their bytes are hashed.
        length: how many hex digits to keep (16 identifies a stage's inputs); None keeps all 64.
    """
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:length]
