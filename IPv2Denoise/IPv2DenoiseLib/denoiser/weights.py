"""Model weights as ``safetensors`` plus a JSON model card; never pickle (docs/architecture.md).

``unet_ipv2.safetensors`` holds the tensors (and, in its header metadata, the architecture and
constructor kwargs, so the file alone can rebuild the network); ``unet_ipv2.json`` next to it is
the model card: architecture, kwargs, in_slices, parameters, FLOPs/voxel, normalisation,
training strategy, data, iterations, hardware, validation metrics and the file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.model_reference import card_path, read_card
from IPv2DenoiseLib.denoiser.models import build_model, count_parameters, flops_per_voxel, model_class
from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import noise_channels
from IPv2DenoiseLib.denoiser.normalization import NORMALIZATION

#: Card keys :func:`save_model` fills in itself (a caller's values for these are replaced).
DERIVED_KEYS = (
    "architecture",
    "kwargs",
    "in_slices",
    "parameters",
    "flops_per_voxel",
    "normalization",
    "sha256",
)


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Parameters
    ----------
    path : path-like
        The file.
    chunk : int
        Bytes read at a time (bounds memory for large files).

    Returns
    -------
    str
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes_via(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)


def save_model(
    model: Denoiser2p5D, path: str | os.PathLike, card: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``path`` (safetensors) and its model card ``path.with_suffix('.json')``.

    Parameters
    ----------
    model : Denoiser2p5D
        A network from :mod:`IPv2DenoiseLib.denoiser.models` (its ``ARCH`` and ``config`` are recorded).
    path : path-like
        Output ``.safetensors`` file; written to a temp file and renamed.
    card : dict, optional
        Training facts to record (``strategy``, ``data``, ``iterations``, ``hardware``,
        ``validation``, ...). JSON-serialisable.

    Returns
    -------
    dict
        The full card as written, including ``sha256`` of the weights file.

    Raises
    ------
    UserError
        ``path`` does not end in ``.safetensors``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"weights path must end in .safetensors, got {str(path)!r}")
    arch, kwargs = model.ARCH, dict(model.config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"architecture": arch, "kwargs": json.dumps(kwargs), "normalization": NORMALIZATION}
    _atomic_write_bytes_via(path, lambda tmp: save_file(state, tmp, metadata=meta))
    full = dict(card or {})
    full.update(
        architecture=arch,
        kwargs=kwargs,
        in_slices=model.in_slices,
        parameters=count_parameters(model),
        flops_per_voxel=round(flops_per_voxel(model)),
        normalization=NORMALIZATION,
        weights=path.name,
        sha256=sha256_file(path),
    )
    text = json.dumps(full, indent=2, sort_keys=False) + "\n"

    def write_card(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write_bytes_via(card_path(path), write_card)
    return full


def _check_state_fits(path: Path, arch: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that the card's network would not hold, before that network takes memory.

    The card (or header) is as hostile as the tensors: its keywords could ask for a network of
    terabytes. So the network is first laid out on PyTorch's ``meta`` device (shapes, no
    storage) and compared, name by name and shape by shape, with the file's tensors, whose size
    the file itself bounds; only a network that matches them is then built for real. Non-finite
    values are refused too: a network with a NaN weight writes an all-NaN image.
    """
    try:
        with torch.device("meta"):
            skeleton = build_model(arch, **kwargs)
    except (RuntimeError, ValueError, OverflowError) as exc:
        raise UserError(
            f"model card of {str(path)!r} does not describe a network ({arch!r} {kwargs}): {exc}"
        ) from None
    wanted = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise UserError(
            f"weights {str(path)!r} do not fit architecture {arch!r} {kwargs}: "
            f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    for name, shape in wanted.items():
        if tuple(state[name].shape) != shape:
            raise UserError(
                f"weights {str(path)!r} do not fit architecture {arch!r} {kwargs}: "
                f"{name} has shape {tuple(state[name].shape)}, the network needs {shape}"
            )
    broken = [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if broken:
        raise UserError(
            f"weights {str(path)!r} hold non-finite values (NaN or infinity) in {len(broken)} tensors, "
            f"e.g. {broken[0]}: the training that made them diverged"
        )


def _not_safetensors(path: Path, exc: Exception) -> UserError:
    return UserError(f"weights file {str(path)!r} is not a valid safetensors file: {exc}")


def _card_from_header(path: Path, header: dict[str, str]) -> dict[str, Any]:
    """The card of a weights file without one: what :func:`save_model` wrote into its header."""
    if "architecture" not in header:
        raise UserError(f"weights file {str(path)!r} has no model card and no architecture in its header")
    try:
        header_kwargs = json.loads(header.get("kwargs", "{}"))
    except json.JSONDecodeError as exc:
        raise UserError(f"weights file {str(path)!r}: its header's kwargs are not JSON ({exc})") from None
    return {
        "architecture": header["architecture"],
        "kwargs": header_kwargs,
        "normalization": header.get("normalization"),
    }


def takes_noise_map(path: str | os.PathLike) -> bool:
    """Whether the network of a weights file takes a noise level map, from its model card (else the
    file's header) alone: no tensor is read, no checksum taken, no network built.

    ``batch`` asks it before any work, so that a ``--strength`` the network cannot take is refused
    at once; :func:`load_model` reads the same card or header.

    Parameters
    ----------
    path : path-like
        The ``.safetensors`` file. Its model card (``.json`` next to it) is read if present.

    Returns
    -------
    bool
        True for the noise-aware architectures (``unet-nm``, ``unet-nmt``).

    Raises
    ------
    UserError
        Missing or corrupt file, an invalid card, no architecture or an unknown one.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist")
    card = read_card(path)
    if card is None:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise _not_safetensors(path, exc) from None
        card = _card_from_header(path, header)
    try:
        network = model_class(str(card.get("architecture")))
    except UserError as exc:
        raise UserError(f"weights {str(path)!r}: {exc}") from None
    return noise_channels(network) > 0


def load_model(
    path: str | os.PathLike, *, expected_sha256: str | None = None
) -> tuple[Denoiser2p5D, dict[str, Any]]:
    """Rebuild a network from safetensors weights, verifying the checksum first.

    Parameters
    ----------
    path : path-like
        The ``.safetensors`` file. Its model card (``.json`` next to it) is read if present.
    expected_sha256 : str, optional
        The checksum a registry lists; the card's ``sha256`` is checked too.

    Returns
    -------
    model : Denoiser2p5D
        In eval mode, on the CPU.
    card : dict
        The model card (or the file's header metadata if there is no card) with ``sha256``.

    Raises
    ------
    UserError
        Missing or corrupt file, checksum mismatch, unknown architecture, tensors that do not
        fit the architecture, or a different intensity normalisation.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist")
    digest = sha256_file(path)
    card = read_card(path)
    for source, want in (("expected", expected_sha256), ("model card", (card or {}).get("sha256"))):
        if want is not None and not isinstance(want, str):
            raise UserError(f"{source} sha256 for {str(path)!r} is not a text checksum: {want!r}")
        if want and want.lower() != digest:
            raise UserError(f"checksum mismatch for {str(path)!r}: {source} sha256 {want}, file has {digest}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _not_safetensors(path, exc) from None
    if card is None:
        card = _card_from_header(path, header)
    card = {**card, "sha256": digest}
    norm = card.get("normalization")
    if norm is not None and norm != NORMALIZATION:
        raise UserError(
            f"weights {str(path)!r} use normalization {norm!r}; this version supports {NORMALIZATION!r}"
        )
    kwargs = card.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"model card of {str(path)!r}: 'kwargs' must be an object, got {kwargs!r}")
    _check_state_fits(path, str(card.get("architecture")), kwargs, state)
    model = build_model(str(card.get("architecture")), **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise UserError(
            f"weights {str(path)!r} do not fit architecture {card.get('architecture')!r} {kwargs}: {first}"
        ) from None
    model.eval()
    return model, card


__all__ = ["DERIVED_KEYS", "card_path", "load_model", "save_model", "sha256_file", "takes_noise_map"]
