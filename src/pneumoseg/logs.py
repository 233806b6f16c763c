"""Logging set-up for every entry point (the stage scripts, the leaderboard, the server, the tools): one format,
INFO by default. A low module that imports nothing of the package, so that any layer may call it.

It also keeps where a long run is, so that an interrupt (Ctrl-C) can say where it stopped: a loop marks each step
with :func:`place` (stage 03: ``fold 0``, then ``epoch 3 of 30`` inside it); the entry point that catches
``KeyboardInterrupt`` prints :func:`interrupted_message`, e.g. "interrupted in fold 0, epoch 3 of 30; rerun the
same command to continue".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr as ``HH:MM:SS LEVEL message``.

    Args:
        verbose: log DEBUG records too (default INFO and above).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt=DATE_FORMAT)


_places: list[str] = []


@contextmanager
def place(text: str) -> Iterator[None]:
    """Mark the code inside the ``with`` block as running at ``text``; nested places join (``fold 0, epoch 3``).

    An exception leaves the mark in place, so that the handler which catches it can still name where it happened;
    :func:`clear` forgets every mark.

    Args:
        text: the step, as the user would name it (``"fold 0"``, ``"epoch 3 of 30"``).
    """
    _places.append(text)
    yield
    _places.pop()


def where() -> str:
    """The marks in force, outermost first (``"fold 0, epoch 3 of 30"``), or ``""``."""
    return ", ".join(_places)


def clear() -> None:
    """Forget every mark (at the start of a command, and after its interrupt was reported)."""
    _places.clear()


def interrupted_message() -> str:
    """The one line an interrupted command prints: where it stopped, and that rerunning it continues."""
    at = where()
    return f"interrupted{' in ' + at if at else ''}; rerun the same command to continue"
