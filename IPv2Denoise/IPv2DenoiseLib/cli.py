"""``ipv2-denoise`` command line: one subcommand per module in :mod:`IPv2DenoiseLib.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
A :class:`~IPv2DenoiseLib.errors.UserError` is printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError

#: Command modules in the order ``--help`` lists them.
COMMAND_MODULES = (
    "info",
    "simulate",
    "purify",
    "make_dataset",
    "train",
    "denoise",
    "demo",
    "evaluate",
)


def _available_commands():
    for name in COMMAND_MODULES:
        full = f"{__package__}.commands.{name}"
        if importlib.util.find_spec(full) is not None:
            yield importlib.import_module(full)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipv2-denoise",
        description="Denoise ultra-low-dose lung CT with IPv2-trained models (Gong & Yu, arXiv 2602.19314).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _available_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"ipv2-denoise {args.command}: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"ipv2-denoise {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
