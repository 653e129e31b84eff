"""``ipv2-denoise`` command line: one subcommand per module in :mod:`IPv2DenoiseLib.app.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
A :class:`~IPv2DenoiseLib.core.errors.UserError` is printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from IPv2DenoiseLib import __version__
from IPv2DenoiseLib.core.errors import UserError

#: Command modules in the order ``--help`` lists them.
COMMAND_MODULES = (
    "info",
    "simulate",
    "purify",
    "make_dataset",
    "train",
    "denoise",
    "batch",
    "batch_summary",
    "send",
    "serve",
    "demo",
    "evaluate",
)


def command_modules():
    """The command modules, imported; a module that fails to import raises (a broken command is loud)."""
    return [importlib.import_module(f"{__package__}.commands.{name}") for name in COMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipv2-denoise",
        description="Denoise ultra-low-dose lung CT with IPv2-trained models (Gong & Yu, arXiv 2602.19314).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in command_modules():
        # argparse %-formats help strings: a literal "2 %" in HELP must not crash --help
        p = sub.add_parser(module.NAME, help=module.HELP.replace("%", "%%"), description=module.HELP)
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
