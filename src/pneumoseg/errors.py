"""Exceptions that carry a message meant for the user: what went wrong, where, and how to fix it.

The command-line entry points print these without a traceback and exit non-zero; anything else is a bug
and keeps its traceback.
"""

import re

_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def plain_reason(exc: BaseException) -> str:
    """What an exception of a library says, fit for a user: its message without Python object reprs
    (``<_io.BytesIO object at 0x7f...>``) and only its first line; its type's name when it says nothing else.

    Args:
        exc: the exception.
    """
    text = _OBJECT_REPR.sub("", str(exc)).strip().splitlines()
    return text[0].strip() if text and text[0].strip() else f"{type(exc).__name__}"


class PneumosegError(Exception):
    """Base class of every error the user can fix (bad input, bad config, missing files)."""


class ConfigError(PneumosegError):
    """A config file or override is missing, malformed, or names an unknown key."""


class DataError(PneumosegError):
    """An input file is missing, unreadable or malformed; the message names the file and the fix."""
