"""Exceptions that carry a message meant for the user: what went wrong, where, and how to fix it.

The command-line entry points print these without a traceback and exit non-zero; anything else is a bug
and keeps its traceback.
"""


class PneumosegError(Exception):
    """Base class of every error the user can fix (bad input, bad config, missing files)."""


class ConfigError(PneumosegError):
    """A config file or override is missing, malformed, or names an unknown key."""


class DataError(PneumosegError):
    """An input file is missing, unreadable or malformed; the message names the file and the fix."""
