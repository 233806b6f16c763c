"""Crash-safe file writing: every output is written to a temporary file beside it, then renamed.

A reader therefore sees either the old complete file or the new complete file, never half of one. The
temporary file is removed when the write fails; one left by a killed process (``.<name>.tmp-<host>-<pid>-<random>``,
hidden) is removed by the next process that writes into that folder (see :func:`sweep_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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


# Temporary names say who made them, so that another process can tell a killed writer's leftovers from a live
# writer's file: the host's short name (letters and digits only) and the process id.
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname().split(".")[0])
_TEMP_RE = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[a-z0-9_]{8}(\.[^.]*)?$")
STALE_AFTER_S = 24 * 3600
"""A temporary file untouched this long is stale whoever made it (a process on another host, say)."""
_swept: set[str] = set()  # the folders this process has already swept


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` if the block succeeds.

    Args:
        path: final location. Its parent folders are created.

    The temporary file is ``.<name>.tmp-<host>-<pid>-<random><suffix>``: hidden, and keeping the target's
    suffix so that writers which pick a format from the suffix (OpenCV, numpy, pandas) still work. It is
    removed when the block raises. The first write of a process into a folder sweeps it of stale temporary
    files (:func:`sweep_stale_temporaries`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if str(target.parent) not in _swept:
        sweep_stale_temporaries(target.parent)
        _swept.add(str(target.parent))
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.tmp-{_HOST}-{os.getpid()}-", suffix=target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` that no live writer owns, and return them.

    Args:
        folder: the folder to sweep (not its subfolders).

    A temporary file is stale when the process named in it is gone from this host, or when it has not been
    touched for :data:`STALE_AFTER_S` (its writer was on another host, or its process id was reused).
    """
    removed = []
    now = time.time()
    with os.scandir(os.fspath(folder)) as entries:
        for entry in entries:
            match = _TEMP_RE.match(entry.name) if entry.name.startswith(".") else None
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            dead = match["host"] == _HOST and not process_alive(int(match["pid"]))
            try:
                if dead or now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except FileNotFoundError:  # its writer renamed it, or another sweep removed it, meanwhile
                continue
    return removed


def process_alive(pid: int) -> bool:
    """True while a process of this id exists on this host (whoever owns it)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


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


class ShortWriteError(DataError):
    """A file that holds fewer bytes than were written to it, with no error from the system (a full disk on some
    file systems); it is never renamed to its final name."""


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, checking before the rename that the file holds every byte.

    Raises:
        OSError: the system's own failure (ENOSPC for a full disk).
        ShortWriteError: the file came out shorter than ``data`` without an error.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        stored = os.stat(tmp).st_size
        if stored != len(data):
            raise ShortWriteError(
                f"could not write {path}: {stored} of its {len(data)} bytes were stored (is the disk full?)"
            )


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an 8-bit grey (HxW) or colour (HxWx3, RGB) image, or a 16-bit grey one, as PNG, atomically (see
    :func:`write_bytes`).

    OpenCV encodes in memory and Python writes the file: OpenCV's own file functions take no name that is not
    UTF-8 (a surrogate-escaped one crashes them) and report success on a full disk."""
    write_bytes(path, _encode(path, image, ".png", []))


def write_jpeg(path: str | os.PathLike, image: np.ndarray, quality: int = 90) -> None:
    """Write an 8-bit grey or RGB image as JPEG at ``quality``, atomically, without chroma subsampling, so that thin
    coloured lines keep their colour (for pictures people look at: a tenth of a PNG's bytes and time)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    write_bytes(path, _encode(path, image, ".jpg", params))


def _encode(path: str | os.PathLike, image: np.ndarray, extension: str, params: list[int]) -> bytes:
    """``image`` (RGB when it has three channels) encoded by OpenCV as ``extension``."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    encoded, data = cv2.imencode(extension, image, params)
    if not encoded:
        raise DataError(f"could not write {path}: OpenCV refused an array of shape {image.shape}")
    return data.tobytes()


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit grey PNG as an HxW uint8 array; a missing or unreadable file is a DataError. (Python reads
    the file and OpenCV decodes the bytes, for names in any bytes.)"""
    try:
        data = Path(path).read_bytes()
    except OSError:
        data = b""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if data else None
    if image is None:
        raise DataError(f"cannot read image {path}: missing or not a PNG. Rerun the stage that writes it.")
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def is_whole_png(path: str | os.PathLike, width: int, height: int) -> bool:
    """Whether ``path`` is a complete 8-bit grey PNG of ``width`` x ``height``, from its first 33 and last 12 bytes:
    the signature, an IHDR chunk of that size, bit depth 8 and colour type grey, and the IEND chunk at the end.

    A zero-byte, cut, foreign or wrongly sized file fails; the chunks between are not read (a file altered in the
    middle after a complete write passes), so that a resume over thousands of PNGs costs two small reads each.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(33)
            handle.seek(-len(_PNG_IEND), os.SEEK_END)
            tail = handle.read()
    except OSError:  # missing, unreadable, or shorter than an IEND chunk
        return False
    return (
        head[:16] == _PNG_SIGNATURE + b"\x00\x00\x00\rIHDR"
        and tail == _PNG_IEND
        and head[16:26] == width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x00"
    )


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
