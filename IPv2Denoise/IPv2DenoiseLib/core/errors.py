"""The one exception type for errors a user can cause (DESIGN.md §3).

Front ends catch :class:`UserError`, show its one-line message and, in the CLI, exit with
status 2 — never a traceback. Anything else escaping the core is a bug.
"""


class UserError(ValueError):
    """A problem with the user's input, options or environment, described in one line."""

    exit_code = 2

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # one line, always
        super().__init__(message)
