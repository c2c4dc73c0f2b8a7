"""Errors a user can act on. The CLI prints their message as one line and exits with `exit_code`."""

from __future__ import annotations

import os

# Exit codes, documented in the README: they mean the same thing in every command.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # the command ran, but what it checked did not hold (verify beyond tolerance)
EXIT_USAGE = 2  # impossible options (click uses 2 for usage errors too)
EXIT_BAD_INPUT = 3  # missing path, corrupt file, unsupported architecture, existing output
EXIT_IO = 4  # the disk failed us (full, read-only, permission)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM
EXIT_INTERNAL = 70  # a bug in moekit


class MoekitError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = EXIT_BAD_INPUT


class UsageError(MoekitError):
    exit_code = EXIT_USAGE


class DiskError(MoekitError):
    """The output's disk cannot take it (found before writing, so nothing was written)."""

    exit_code = EXIT_IO



def one_line(text) -> str:
    """A message (a library's, often several lines) as one line: whitespace runs become one space."""
    return " ".join(str(text).split())


def check_utf8(path, what: str) -> None:
    """moekit.json and the model card name paths in UTF-8 JSON; refuse a name that has no UTF-8 form."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} name {os.fsencode(path)!r} is not valid UTF-8; choose a UTF-8 name") from None
