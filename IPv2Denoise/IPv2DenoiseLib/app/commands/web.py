"""``ipv2-denoise web [INPUT]``: the denoising panel in a browser, on Slicer's own views (the [web] extra)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from IPv2DenoiseLib.app.arguments import add_device_argument, positive_float
from IPv2DenoiseLib.app.pacs import add_peer_arguments
from IPv2DenoiseLib.app.web.data_root import DataRoot
from IPv2DenoiseLib.core.atomic import resolve_path
from IPv2DenoiseLib.core.errors import UserError

if TYPE_CHECKING:
    from IPv2DenoiseLib.app.web.jobs import PacsPeer

NAME = "web"
HELP = (
    "Serve the denoising panel to a browser: open a scan from --data-root, denoise with progress and "
    "Cancel, compare original, denoised and difference on linked Slicer views, read the ROI metrics, "
    "export the derived DICOM series (into the data root or to --pacs)."
)
#: Environment variable holding the access token (not visible in the process list, unlike --token).
TOKEN_ENV = "IPV2_DENOISE_WEB_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", nargs="?", default=None, help="a CT volume or DICOM folder inside --data-root to open first"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; see docs/web.md before 0.0.0.0)",
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="TCP port (default: %(default)s; 0: any free one)"
    )
    parser.add_argument(
        "--data-root",
        default=".",
        metavar="DIR",
        help="the only folder the page may open scans from and export into (default: the current folder)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"access token the page must carry (URL ...?secret=TOKEN); better set {TOKEN_ENV}, "
        "which other users cannot read in the process list; without either, a random token is made "
        "and printed with the address",
    )
    parser.add_argument(
        "--pacs",
        default=None,
        metavar="HOST:PORT:AET|URL",
        help="a PACS the page may send the derived series to (C-STORE, or STOW-RS to a DICOMweb URL)",
    )
    add_peer_arguments(parser)  # --aet, --calling-aet, --timeout, --retries, as for send and denoise --send
    parser.add_argument(
        "--retrieve-max-minutes",
        type=positive_float,
        default=None,
        metavar="M",
        help="minutes one retrieval from --pacs (its list of images and every image) may take at most; "
        "raise it for large series over a slow link (default: 30; inf: no limit)",
    )
    parser.add_argument(
        "--weights", default=None, help="a .safetensors model offered besides the shipped ones (listed first)"
    )
    add_device_argument(parser)


def configure_rendering() -> None:
    """Offscreen rendering through Mesa EGL where there is no display.

    VTK tries X first when ``VTK_DEFAULT_OPENGL_WINDOW`` is unset and crashes when it is set but
    empty; so without ``DISPLAY`` it becomes ``vtkEGLRenderWindow`` before VTK is imported. A
    non-empty value the user set is kept.
    """
    if not os.environ.get("VTK_DEFAULT_OPENGL_WINDOW") and not os.environ.get("DISPLAY"):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"


@contextlib.contextmanager
def trame_argv(token: str) -> Iterator[None]:
    """trame reads its options from ``sys.argv``: give it only ours (the token), not the CLI's."""
    saved = sys.argv
    sys.argv = [saved[0], f"--authKey={token}"]  # one word: a token may start with "-"
    try:
        yield
    finally:
        sys.argv = saved


def listen_error(exc: OSError, host: str, port: int) -> UserError | None:
    """The one line for a failure to listen on ``host:port`` that the user can fix, else None.

    Parameters
    ----------
    exc : OSError
        What binding the socket raised.
    host, port : str, int
        ``--host`` and ``--port``.

    Returns
    -------
    UserError or None
        The port is taken, the address is not this machine's (or no address at all), or the port
        needs privileges; None for anything else (a bug to report, with its traceback).
    """
    if exc.errno == errno.EADDRINUSE:
        return UserError(
            f"--port {port} is in use (another ipv2-denoise web?); choose another port or --port 0"
        )
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        why = exc.strerror or str(exc)
        return UserError(
            f"--host {host} is not an address of this machine ({why}); use 127.0.0.1 (this machine "
            "only) or one of its own addresses"
        )
    if exc.errno == errno.EACCES:
        return UserError(
            f"--port {port}: permission denied (ports below 1024 need privileges); choose another port"
        )
    return None


def check_listen(host: str, port: int) -> None:
    """Refuse, before the slow start, an address the server could not listen on (as aiohttp binds it).

    Raises
    ------
    UserError
        See :func:`listen_error`.
    """
    try:
        # "" is every address, as for asyncio
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            try:
                probe = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 off): asyncio skips it too
                continue
            with probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # likewise
                probe.bind(address)
    except OSError as exc:
        error = listen_error(exc, host, port)
        if error is None:
            raise
        raise error from None


def pacs_peer(args: argparse.Namespace) -> PacsPeer | None:
    """The ``--pacs`` the page's jobs search, retrieve from and send to, with its options.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``web`` options.

    Returns
    -------
    PacsPeer or None
        None without ``--pacs``.

    Raises
    ------
    UserError
        A malformed ``--pacs``, or ``--retrieve-max-minutes`` without one.
    """
    if not args.pacs:
        if args.retrieve_max_minutes is not None:
            raise UserError("--retrieve-max-minutes: there is no --pacs to retrieve from")
        return None
    from IPv2DenoiseLib.app.web.jobs import PacsPeer  # lazy: the pipeline
    from IPv2DenoiseLib.io.dicom_net import parse_destination  # lazy: pynetdicom

    try:
        destination = parse_destination(args.pacs, args.aet)
    except UserError as exc:
        raise UserError(f"--pacs: {exc}") from None
    minutes = args.retrieve_max_minutes
    return PacsPeer(
        destination,
        args.calling_aet,
        args.timeout,
        args.retries,
        retrieve_max_seconds=None if minutes is None else minutes * 60.0,
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected 0..65535")
    root = DataRoot(args.data_root)
    if args.input:
        start = Path(args.input)
        start = (
            start
            if not start.is_absolute()
            else Path(os.path.relpath(resolve_path(start, "INPUT"), root.root))
        )
        root.input(str(start))  # refused here, before the server starts, when outside --data-root
    if args.weights and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights} does not exist")
    pacs = pacs_peer(args)
    # Always a token: without one, wslink accepts its built-in secret, and any web page the user
    # visits may open a websocket to a loopback port (browsers do not stop it) and drive the panel.
    token = args.token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(18)
    from_environment = not args.token and token == os.environ.get(TOKEN_ENV)
    check_listen(args.host, args.port)  # in a second, not after Slicer has loaded

    configure_rendering()
    try:  # lazy: trame, slicer and VTK are the optional [web] extra
        from IPv2DenoiseLib.app.web.access import require_token_for_page
        from IPv2DenoiseLib.app.web.server import DenoiseWebApp, WebConfig, available_models
    except ImportError as exc:
        raise UserError(
            f"the web app needs the [web] extra ({exc.name or exc}): pip install 'ipv2-denoise[web]'"
        ) from None

    config = WebConfig(
        data_root=root.root,
        input=str(start) if args.input else None,
        device=args.device,
        weights=args.weights,
        pacs=pacs,
        pacs_text=args.pacs or "",
        models=available_models(args.weights),
    )
    app = DenoiseWebApp(config)

    def announce(**_) -> None:
        url = f"http://{args.host}:{app.server.port}/"
        url += f"?secret=<{TOKEN_ENV}>" if from_environment else f"?secret={token}"
        print(f"ipv2-denoise web: serving {url} (data root {root.root})", flush=True)

    app.ctrl.on_server_ready.add(announce)
    app.ctrl.on_server_bind.add(lambda wslink_server: require_token_for_page(wslink_server, token))
    with trame_argv(token):
        try:
            app.server.start(
                host=args.host, port=args.port, open_browser=False, show_connection_info=False, timeout=0
            )
        except OSError as exc:  # taken since the check (another server started meanwhile)
            error = listen_error(exc, args.host, args.port)
            if error is None:
                raise
            raise error from None
    return 0
