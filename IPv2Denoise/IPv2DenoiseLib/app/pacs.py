"""The command line's PACS options and sending with one line per instance (``send``, ``denoise --send``, ``web``)."""

from __future__ import annotations

import argparse
import sys

from IPv2DenoiseLib.app.arguments import non_negative_int, positive_seconds

# pynetdicom, dicomweb-client and requests are imported by send_and_report, not here: every
# ``ipv2-denoise`` start builds all commands' parsers and should not pay ~1 s for them.


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that talks to a PACS (send, denoise --send)."""
    parser.add_argument("--aet", metavar="AET", help="called AE title of the PACS (or give HOST:PORT:AET)")
    parser.add_argument(
        "--calling-aet",
        metavar="AET",
        help="our AE title, as the PACS knows it (default: IPV2DENOISE)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for connect, association and each response (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=non_negative_int,
        default=3,
        metavar="N",
        help="retries of transient failures (aborted association, out of resources, HTTP 5xx) (default: %(default)s)",
    )


def send_and_report(files, destination: str, args: argparse.Namespace, *, lines=None):
    """Send ``files``; print one line per instance (on ``lines``, default stdout) and the summary on stderr.

    Raises
    ------
    UserError
        PACS unreachable, association rejected, or any instance refused (named with the reason).
    """
    # lazy: the CLI imports every command to build --help; pydicom & co. load on use
    from IPv2DenoiseLib.io.dicom_net import DEFAULT_CALLING_AET, parse_destination, send

    target = parse_destination(destination, args.aet)
    calling_aet = args.calling_aet or DEFAULT_CALLING_AET
    report = send(files, target, calling_aet=calling_aet, timeout=args.timeout, retries=args.retries)
    for result in report.results:
        print(result.line(), file=lines or sys.stdout)
    report.raise_for_failures()
    print(report.summary(), file=sys.stderr)
    return report
