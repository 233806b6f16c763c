"""A CSV that grows batch by batch and survives a kill: the ``predict`` command's record of what it has done.

Each batch's rows are appended and synced to disk in one write, after the files they describe are complete, so a
row means its outputs exist. A run killed mid-write leaves at most one cut-off last line; opening the ledger again
drops that line and any repeated source (keeping its last row) and rewrites the file atomically.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pneumoseg.errors import DataError
from pneumoseg.io import atomic_open

# File names from the disk may hold bytes that are not UTF-8; they go through the CSV and back unchanged.
_ENCODING, _ERRORS = "utf-8", "surrogateescape"


class Ledger:
    """The CSV at ``path`` with ``columns``, the first of which names the row's source (one row per source).

    Args:
        path: the file; read (and repaired) when it exists.
        columns: the header.

    Raises:
        DataError: the existing file has another header (another version's, or another file's).
    """

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, tuple(columns)
        self.sources: set[str] = set()
        if path.is_file():
            self._recover()

    def _recover(self) -> None:
        """Read the existing rows: drop a cut-off last line and repeated sources, rewrite if either was found."""
        original = self.path.read_text(encoding=_ENCODING, errors=_ERRORS)
        text = original if original.endswith("\n") else original[: original.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        if text and tuple(reader.fieldnames or ()) != self.columns:
            raise DataError(
                f"{self.path} has the columns {reader.fieldnames}, not {list(self.columns)}: it was "
                f"written by another version or another command; give --output a new folder"
            )
        rows = {row[self.columns[0]]: row for row in reader}
        if text != original or len(rows) != text.count("\n") - 1:
            with atomic_open(self.path, "w", newline="", encoding=_ENCODING, errors=_ERRORS) as handle:
                handle.write(_csv_text(self.columns, rows.values(), header=True))
        self.sources = set(rows)

    def append(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append rows (dicts with the ledger's columns) in one synced write; nothing when there are none."""
        rows = list(rows)
        if not rows:
            return
        text = _csv_text(self.columns, rows, header=not self.path.is_file())
        with open(self.path, "a", newline="", encoding=_ENCODING, errors=_ERRORS) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        self.sources.update(str(row[self.columns[0]]) for row in rows)

    def rows(self) -> list[dict[str, str]]:
        """Every row, as strings, in the order written."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding=_ENCODING, errors=_ERRORS) as handle:
            return list(csv.DictReader(handle))


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, object]], header: bool) -> str:
    """Rows as CSV text; a line break inside a value becomes a space, so that a line is a row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({key: " ".join(str(value).splitlines()) for key, value in row.items()} for row in rows)
    return buffer.getvalue()
