"""``ipv2-denoise`` command line: one subcommand per module in :mod:`IPv2DenoiseLib.app.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
they are imported here by name (commands never import each other: what two share lives in
:mod:`~IPv2DenoiseLib.app.arguments` or :mod:`~IPv2DenoiseLib.app.pacs`).
A :class:`~IPv2DenoiseLib.core.errors.UserError` is printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from collections.abc import Sequence
from contextlib import contextmanager

from IPv2DenoiseLib import __version__
from IPv2DenoiseLib.app.commands import (
    batch,
    batch_summary,
    demo,
    denoise,
    evaluate,
    info,
    make_dataset,
    purify,
    send,
    serve,
    simulate,
    train,
    web,
)
from IPv2DenoiseLib.core.errors import ExitCode, UserError

#: Command modules in the order ``--help`` lists them.
COMMANDS = (
    info,
    simulate,
    purify,
    make_dataset,
    train,
    denoise,
    batch,
    batch_summary,
    send,
    serve,
    demo,
    evaluate,
    web,
)


def command_modules():
    """The command modules, in the order ``--help`` lists them."""
    return list(COMMANDS)


#: Errors of the machine or the file system that a user can cause or fix (a full disk, a folder
#: that vanished, a loop of symbolic links, no permission): one line and exit 2, never a traceback.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ELOOP,
        errno.EROFS,
        errno.EIO,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.EMFILE,
    }
)


class OneLineErrorParser(argparse.ArgumentParser):
    """A parser whose errors are one line (``ipv2-denoise denoise: error: ...``), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def describe_os_error(exc: OSError) -> str:
    """One line for an :class:`OSError` of the file system: what failed, on which path."""
    where = f" {exc.filename}" if exc.filename else ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space or choose an output on another disk)"
    return f"{reason}:{where}" if where else reason


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="ipv2-denoise",
        description="Denoise ultra-low-dose lung CT with IPv2-trained models (Gong & Yu, arXiv 2602.19314).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for module in command_modules():
        # argparse %-formats help strings: a literal "2 %" in HELP must not crash --help
        p = sub.add_parser(module.NAME, help=module.HELP.replace("%", "%%"), description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, ``kill``, a job scheduler): stop as Ctrl-C does."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM becomes :class:`Terminated` for the block, so every command stops cleanly on it:
    staged outputs removed, claims released, ``batch`` writing its summary, one line. Python's
    default ends the process at once (exit 143, nothing said, staging folders and locks left).
    Commands with their own handling (``train``, ``serve``) replace it while they run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _terminate_as_interrupt():
            status = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return status
    except UserError as exc:
        print(f"ipv2-denoise {args.command}: error: {exc}", file=sys.stderr)
        return ExitCode.USER_ERROR
    except KeyboardInterrupt as exc:
        why = " (SIGTERM)" if isinstance(exc, Terminated) else ""
        print(f"ipv2-denoise {args.command}: cancelled{why}", file=sys.stderr)
        return ExitCode.CANCELLED
    except BrokenPipeError:
        # the reader stopped reading (| head): quiet, and no second error when Python flushes stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"ipv2-denoise {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return ExitCode.USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
