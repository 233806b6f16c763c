"""Unpack a finished training job's archives safely: regular files and folders only, no absolute paths, no ``..``,
no links or devices, so that an archive cannot write outside the folder it is unpacked into."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath

from pneumoseg.errors import DataError


def _member_path(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    """The member's path inside the archive, checked; ``./`` prefixes dropped."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise DataError(f"{archive} holds {member.name!r}, a path outside the folder it unpacks into; "
                        f"this is not an archive SageMaker wrote: download the job's archive again")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive} holds {member.name!r}, a link or special file; SageMaker's archives hold "
                        f"only files and folders: download the job's archive again")
    return PurePosixPath(*[part for part in path.parts if part != "."])


def extract(archive: str | Path, target: str | Path, prefix: str = "") -> list[Path]:
    """Unpack the regular files of ``archive`` (a tar, gzipped or not) under ``target``.

    Args:
        archive: the tar file.
        target: the folder to unpack into (created).
        prefix: when given, only the members under this folder of the archive are unpacked, without it.

    Returns:
        The files written.

    Raises:
        DataError: the archive is missing or unreadable, or holds a link, a special file or a path leading
            outside ``target``.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise DataError(f"{archive} not found; give the job's archive (download it from the job's S3 output path)")
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                path = _member_path(archive, member)
                if prefix:
                    if not path.parts or path.parts[0] != prefix or len(path.parts) == 1:
                        continue
                    path = PurePosixPath(*path.parts[1:])
                if member.isfile() and path.parts:
                    destination = target.joinpath(*path.parts)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as source, open(destination, "wb") as sink:
                        shutil.copyfileobj(source, sink)
                    written.append(destination)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive} is not a readable tar archive ({exc}); download the job's archive again") \
            from exc
    return written
