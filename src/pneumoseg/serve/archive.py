"""Extracting an untrusted tar archive (a model package, or a SageMaker job's archives for
:mod:`pneumoseg.stages.import_job`): regular files and folders only, with normalised relative names, within a member
count and a total size, whatever the Python version. The project's one extractor.

tarfile's ``filter="data"`` is not enough on its own: Python releases before 3.11.13 / 3.12.11 / 3.13.4 let a
chain of symbolic links (CVE-2025-4517) write outside the folder it checks. A model package holds only files
and folders, so every other kind of member is refused, all of them before anything is written, and the files
are written by this module (``open(..., "xb")``: never through an existing path; a file a first archive left is
unlinked before a second one writes it) rather than by tarfile.
"""

from __future__ import annotations

import posixpath
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pneumoseg.errors import DataError
from pneumoseg.stage_table import command

MAX_MEMBERS = 10_000
"""The most entries an archive may hold (a package has about a hundred: its source files and weights)."""
MAX_EXTRACTED_BYTES = 16 << 30
"""The most bytes its files may hold together, 16 GiB (five folds of a large encoder are about 1.5 GB)."""
MAX_INFLATION = 100
"""Past :data:`INFLATION_ALLOWANCE`, an archive's files may hold at most this many times the archive's own size:
weights barely compress and logs about tenfold, while a decompression bomb inflates a thousandfold."""
INFLATION_ALLOWANCE = 256 << 20
"""Bytes any archive may inflate to, whatever its size."""


@dataclass(frozen=True)
class ArchiveKind:
    """What an archive is, for the error messages, and how its names may begin.

    Attributes:
        noun: what it is called (``"model package"``); a message names it with the archive's path.
        fix: what to do about an archive that is refused.
        dot_prefix: accept names that begin with ``./`` and the ``.`` entry (``tar -C folder .`` writes them),
            read without it.
    """

    noun: str
    fix: str
    dot_prefix: bool = False


MODEL_PACKAGE = ArchiveKind("model package", f"rebuild the package with {command('06')}")


def check_relative_name(name: str, what: str, fix: str = MODEL_PACKAGE.fix) -> str:
    """``name`` when it is a normalised relative POSIX path that stays inside its folder.

    Args:
        name: the path to check, as written in an archive or a manifest.
        what: what the name belongs to, for the error message (``"model package x.tar.gz"``, say).
        fix: what to do about it, for the error message.

    Raises:
        DataError: an empty or absolute name, one with ``..``, ``.`` or empty parts, a backslash or a NUL, or one
            that normalises to another name.
    """
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or any(part in ("", ".", "..") for part in parts)
        or posixpath.normpath(name) != name
    ):
        raise DataError(
            f"{what}: the name {name!r} is not a plain relative path inside the package (absolute, "
            f"'..', '.', empty parts or backslashes are refused); {fix}"
        )
    return name


def extract_archive(
    archive_path: Path,
    folder: Path,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_EXTRACTED_BYTES,
    kind: ArchiveKind = MODEL_PACKAGE,
    prefix: str = "",
) -> list[Path]:
    """Extract the tar archive ``archive_path`` (any compression tarfile reads) into ``folder``.

    Args:
        archive_path: the archive.
        folder: an existing folder: empty, or holding only what an earlier archive extracted there.
        max_members: the most entries accepted.
        max_bytes: the most bytes of file content accepted, all files together.
        kind: what the archive is (default a model package), for the messages and the names it may hold.
        prefix: when given, only the members under this folder of the archive are extracted, without it (every
            member is checked all the same).

    Returns:
        The files written.

    Raises:
        DataError: the archive is missing, unreadable or truncated, or holds anything but regular files and
            folders with names :func:`check_relative_name` accepts, a name twice, a file where a folder is needed,
            more than ``max_members`` entries or ``max_bytes`` bytes, more than :data:`MAX_INFLATION` times its own
            size (past :data:`INFLATION_ALLOWANCE`), or more than the disk has free. Nothing is written unless every
            entry passes.
    """
    what = f"{kind.noun} {archive_path}"
    if not Path(archive_path).is_file():
        raise DataError(f"{what} not found; {kind.fix}")
    written = []
    try:
        inflated = INFLATION_ALLOWANCE + MAX_INFLATION * Path(archive_path).stat().st_size
        with tarfile.open(archive_path, "r:*") as archive:
            members = _checked_members(archive, what, max_members, min(max_bytes, inflated), kind)
            _check_free_space(members, folder, what)
            for member in members:
                name = _under(member.name, prefix)
                if name is None:
                    continue
                target = folder / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                source = archive.extractfile(member)
                if source is None:  # a regular file always has its content; a broken archive may not
                    raise tarfile.ReadError(f"{member.name} has no content")
                with source, open(target, "xb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                written.append(target)
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = (str(exc).splitlines() or [""])[0]  # tarfile's ReadError lists every codec it tried
        raise DataError(f"cannot extract {what} ({type(exc).__name__}: {reason}); {kind.fix}") from None
    return written


def _under(name: str, prefix: str) -> str | None:
    """``name`` without the folder ``prefix`` ("" for every name); None for a name outside it, or the folder
    itself."""
    if not prefix:
        return name
    head, _, rest = name.partition("/")
    return rest if head == prefix and rest else None


def _checked_members(
    archive: tarfile.TarFile, what: str, max_members: int, max_bytes: int, kind: ArchiveKind
) -> list[tarfile.TarInfo]:
    """Every member of ``archive``, each checked as it is read (so a huge archive is refused early); with
    ``kind.dot_prefix``, names read without their ``./`` and the ``.`` entry left out."""
    members: list[tarfile.TarInfo] = []
    files: set[str] = set()
    names: set[str] = set()
    total = 0
    for member in archive:
        if len(members) == max_members:
            raise DataError(f"{what} has more than {max_members} entries; {kind.fix}")
        if kind.dot_prefix:
            if member.name in (".", "./") and member.isdir():
                continue
            member.name = member.name.removeprefix("./")
        name = check_relative_name(member.name, what, kind.fix)
        if not (member.isreg() or member.isdir()):
            raise DataError(
                f"{what}: {name!r} is {_kind(member)}; a {kind.noun} holds only regular files and "
                f"folders. Refusing to extract it: {kind.fix}"
            )
        if name in names:
            raise DataError(f"{what}: {name!r} appears twice; {kind.fix}")
        parts = name.split("/")
        if files.intersection("/".join(parts[:depth]) for depth in range(1, len(parts))):
            raise DataError(f"{what}: {name!r} lies under a file of the same archive; {kind.fix}")
        total += member.size if member.isreg() else 0
        if total > max_bytes:
            raise DataError(
                f"{what}: its files hold more than {max_bytes} bytes (the most for an archive of its "
                f"size: {MAX_INFLATION} times it, past {INFLATION_ALLOWANCE >> 20} MiB, up to "
                f"{MAX_EXTRACTED_BYTES >> 30} GiB): it is damaged or a decompression bomb; {kind.fix}"
            )
        names.add(name)
        if member.isreg():
            files.add(name)
        members.append(member)
    return members


def _check_free_space(members: list[tarfile.TarInfo], folder: Path, what: str) -> None:
    """Refuse an archive whose files need more than the disk under ``folder`` has free."""
    needed = sum(member.size for member in members if member.isreg())
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())  # the folder may be new
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DataError(f"{what}: its files need {needed} bytes, but {folder} has {free} free; free some space")


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"an entry of tar type {member.type!r}"


def file_inside(root: Path, name: str, what: str) -> Path:
    """The file ``root/name``, once ``name`` is a plain relative path and no link leads it out of ``root``.

    Args:
        root: the package folder.
        name: a path relative to it, from its manifest.
        what: where the name comes from, for the error message.

    Raises:
        DataError: a name :func:`check_relative_name` refuses, a symbolic link on the way, or no such file.
    """
    parts = check_relative_name(name, what).split("/")
    for depth in range(1, len(parts) + 1):
        step = root.joinpath(*parts[:depth])
        if step.is_symlink():
            raise DataError(
                f"{what}: {step} is a symbolic link; a package's files must lie in it. Rebuild the "
                f"package with {command('06')}"
            )
    path = root.joinpath(*parts)
    if not path.is_file():
        raise DataError(
            f"{what}: {path} is missing or not a file; copy the package again or rebuild it with "
            f"{command('06')} --force"
        )
    return path
