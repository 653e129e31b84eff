"""``ipv2-denoise serve --port P --aet AET --forward HOST:PORT:AET``: a denoising DICOM node."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from IPv2DenoiseLib.app.arguments import (
    add_model_arguments,
    non_negative_int,
    positive_float,
    positive_seconds,
)
from IPv2DenoiseLib.app.pipeline import DenoiseOptions
from IPv2DenoiseLib.core.device import describe_device
from IPv2DenoiseLib.core.errors import UserError

NAME = "serve"
HELP = (
    "Run a denoising DICOM node: receive CT series (Storage SCP), denoise each complete series "
    "and C-STORE the derived series to --forward."
)


#: ``--keep-failed-days`` default: a month to look into a failed series, then its disk space is back.
KEEP_FAILED_DAYS = 30.0


def days_or_forever(text: str) -> float | None:
    """argparse type of ``--keep-failed-days``: a number of days > 0, or ``forever`` (None).

    Parameters
    ----------
    text : str
        The option's value.

    Returns
    -------
    float or None
        The days; None for ``forever``.

    Raises
    ------
    argparse.ArgumentTypeError
        Neither a finite number > 0 nor ``forever``.
    """
    if text.strip().lower() == "forever":
        return None
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and days > 0):
        raise argparse.ArgumentTypeError(f"expected a number of days > 0 or 'forever', got {text!r}")
    return days


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, required=True, help="TCP port to listen on (DICOM: often 104 or 11112)"
    )
    parser.add_argument(
        "--aet",
        required=True,
        metavar="AET",
        help="the node's AE title (called by senders, calling when forwarding)",
    )
    parser.add_argument(
        "--forward",
        required=True,
        metavar="HOST:PORT:AET",
        help="where derived series are stored (usually the PACS)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--allow-aet",
        action="append",
        default=[],
        metavar="AET",
        help="accept associations only from this calling AE title (repeatable; default: any, logged as a warning)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST/CIDR",
        help="accept associations only from this IP address or network, e.g. 10.0.0.0/24 (repeatable; default: any)",
    )
    parser.add_argument(
        "--max-instance-mb",
        type=positive_float,
        default=512.0,
        metavar="MB",
        help="refuse (0xA700) a received instance larger than this, and abort an association whose "
        "instance passes it by 1 MB while arriving (default: %(default)g)",
    )
    parser.add_argument(
        "--spool",
        default="ipv2-spool",
        metavar="DIR",
        help="folder for received and queued series; kept across restarts (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-failed-days",
        type=days_or_forever,
        default=KEEP_FAILED_DAYS,
        metavar="D",
        help="delete a failed series (SPOOL/failed/, patient data) D days after it failed, checked at "
        "start and hourly, each deletion logged; 'forever' keeps them until deleted by hand "
        f"(default: {KEEP_FAILED_DAYS:g})",
    )
    parser.add_argument(
        "--quiet-seconds",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="a series is complete when nothing of it arrived for S seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="series denoised at once (default: %(default)s)"
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="network timeout in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=non_negative_int,
        default=3,
        metavar="N",
        help="retries of transient forwarding failures (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-seconds",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="first wait before re-sending to an unavailable --forward (doubles, at most 600 s) (default: %(default)s)",
    )


@contextmanager
def node_logging() -> Iterator[None]:
    """The node's log on stderr (time, level, message; pynetdicom's warnings, not pydicom's
    tracebacks) for the run, and the process's logging as it was afterwards.

    ``serve`` may run inside another program (a test, an embedding application); leaving a handler
    bound to a stream that is later closed turned every later pynetdicom line into a "Logging error".
    """
    # lazy: pydicom sets its own logger's level when first imported; import it before setting ours
    import pydicom  # noqa: F401

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("pynetdicom", "pydicom")})
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom logs a whole traceback when a decoder fails; the node logs the refusal in one line
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        handler.flush()
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)


def run(args: argparse.Namespace) -> int:
    with node_logging():
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    """Check the options, load the model once, run the node until SIGTERM/SIGINT."""
    # lazy: torch (through the Denoiser), pydicom and pynetdicom load here, not at every CLI start-up
    from IPv2DenoiseLib.app.dicom_node import DenoisingNode, HostAllowList, NodeConfig
    from IPv2DenoiseLib.app.pipeline import DenoisePipeline
    from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions
    from IPv2DenoiseLib.io.dicom_net import check_aet, parse_node

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be between 1 and 65535")
    if not math.isfinite(args.max_instance_mb):
        raise UserError(f"--max-instance-mb {args.max_instance_mb}: must be a finite number of MB")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be at least 1")
    check_aet(args.aet, "--aet")
    if args.forward.count(":") < 2:  # parse_node's hint would name --aet, which here is the node's own title
        raise UserError(
            f"--forward {args.forward!r}: expected HOST:PORT:AET (AET: the PACS's called AE title)"
        )
    forward = parse_node(args.forward, what="--forward")
    allow_hosts = HostAllowList(args.allow_host)
    allow_aets = tuple(check_aet(aet, "--allow-aet") for aet in args.allow_aet)
    spool = Path(args.spool)
    if spool.exists() and not spool.is_dir():
        raise UserError(f"--spool {spool}: exists and is not a folder")
    pipeline = DenoisePipeline(DenoiseOptions.from_args(args))
    device = pipeline.device  # "--device cuda" without a GPU fails before the model loads
    denoiser = pipeline.denoiser()  # loaded once, before the job threads share it
    provenance = pipeline.reference.provenance(
        denoiser.card, strength=pipeline.options.strength, ensemble=pipeline.options.ensemble
    )
    logging.getLogger("ipv2denoise.node").info(
        "model %s (sha256 %s) on %s, denoising strength %g, test-time ensemble %d",
        denoiser.name,
        provenance.sha256,
        describe_device(device),
        provenance.strength,
        provenance.ensemble,
    )
    config = NodeConfig(
        aet=args.aet,
        port=args.port,
        forward=forward,
        spool=spool,
        host=args.host,
        quiet_seconds=args.quiet_seconds,
        jobs=args.jobs,
        timeout=args.timeout,
        retries=args.retries,
        retry_seconds=args.retry_seconds,
        options=DerivedSeriesOptions(),
        allow_aets=allow_aets,
        allow_hosts=allow_hosts,
        max_instance_bytes=int(args.max_instance_mb * 2**20),
        keep_failed_days=args.keep_failed_days,
    )
    node = DenoisingNode(config, pipeline)
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a stop while it starts is a clean stop too
        signal.signal(sig, lambda *_: node.request_stop())
    node.start()
    try:
        node.wait()
    finally:
        node.stop()
    return 0
