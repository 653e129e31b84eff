"""``ipv2-denoise send DIR --to HOST:PORT --aet AET``: store a DICOM series on a PACS (C-STORE or STOW-RS)."""

from __future__ import annotations

import argparse

from IPv2DenoiseLib.app.pacs import add_peer_arguments, send_and_report

# pynetdicom, dicomweb-client and requests are imported by the functions below, not here: every
# ``ipv2-denoise`` start builds all commands' parsers and should not pay ~1 s for them.

NAME = "send"
HELP = "Send DICOM files to a PACS: C-ECHO then C-STORE to HOST:PORT (--aet), or STOW-RS to a DICOMweb URL."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", metavar="DIR", nargs="+", help="DICOM folder(s) (searched recursively) or files"
    )
    parser.add_argument(
        "--to",
        required=True,
        metavar="DEST",
        help="HOST:PORT (with --aet), HOST:PORT:AET, or a DICOMweb base URL (http(s)://host/dicom-web)",
    )
    add_peer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; pydicom & co. load on use
    from IPv2DenoiseLib.io.dicom_net import dicom_files, parse_destination

    parse_destination(args.to, args.aet)  # check the destination before reading any file
    files = [f for path in args.paths for f in dicom_files(path)]
    send_and_report(files, args.to, args)
    return 0
