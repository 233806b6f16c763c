"""Logging set-up for every entry point (the stage scripts, the leaderboard, the server, the tools): one format,
INFO by default. A low module that imports nothing of the package, so that any layer may call it."""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr as ``HH:MM:SS LEVEL message``.

    Args:
        verbose: log DEBUG records too (default INFO and above).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt=DATE_FORMAT)
