"""Compute device selection and a one-line description for the "running on:" label."""

from __future__ import annotations

import torch

from IPv2DenoiseLib.core.errors import UserError

#: Values accepted by ``--device``.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device`.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda", "mps"} or torch.device
        ``auto`` picks CUDA, then Apple MPS, then CPU. ``cuda:1`` style indices are allowed.
        A :class:`torch.device` is returned unchanged.

    Raises
    ------
    UserError
        Unknown name, or a GPU kind that this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    kind = key.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise UserError(f"--device {name!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("CUDA requested but no CUDA GPU is available; use --device auto or cpu")
        try:
            device = torch.device(key)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a valid CUDA device; use cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) present; use --device cuda"
            )
        return device
    if kind == "mps":
        if not _mps_available():
            raise UserError("MPS requested but Apple MPS is not available; use --device auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device | str) -> str:
    """One line for the user, e.g. ``"CUDA NVIDIA H100 80GB HBM3, 79.1 GiB"`` or ``"CPU (2 threads)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"CUDA {props.name}, {props.total_memory / 2**30:.1f} GiB"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"
