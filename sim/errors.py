"""The project's error types. Each is a problem with the user's input, files or machine, worded for the user as
`where: reason` (the file, field or option, then what is wrong); the CLI prints one as a single line and exits 2.
Anything else that escapes a command is a bug: the CLI writes its traceback to a file and says where."""

from __future__ import annotations


class StalecastError(Exception):
    """Base of every error the CLI reports as bad input (exit code 2)."""


class OutputError(StalecastError):
    """An output path stalecast may not write: it would replace data stalecast did not write, or it cannot."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it cleans up as for Ctrl-C; the CLI exits 143."""
