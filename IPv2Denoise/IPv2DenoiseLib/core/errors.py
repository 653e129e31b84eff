"""The one exception type for errors a user can cause, and the exit statuses of ``ipv2-denoise``.

Front ends catch :class:`UserError`, show its one-line message and, in the CLI, exit with
status 2 — never a traceback. Anything else escaping the core is a bug.
"""

import enum


class ExitCode(enum.IntEnum):
    """Exit statuses of every ``ipv2-denoise`` command (the Slicer job and scripts read them)."""

    OK = 0
    #: ``batch``: some cases failed (each is recorded with its reason).
    SOME_FAILED = 1
    USER_ERROR = 2
    #: Ctrl-C or Cancel: nothing half-written is left.
    CANCELLED = 130
    #: The reader of our output went away (``info --json | head``): 128 + SIGPIPE, as a shell says.
    BROKEN_PIPE = 141


class UserError(ValueError):
    """A problem with the user's input, options or environment, described in one line."""

    exit_code = ExitCode.USER_ERROR

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # one line, always
        super().__init__(message)
