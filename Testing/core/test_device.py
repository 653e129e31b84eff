"""One device vocabulary: names checked without torch; callers limit the GPU kinds they run on."""

from __future__ import annotations

import pytest
import torch

from IPv2DenoiseLib.core.device import DEVICE_CHOICES, check_device_name, resolve_device
from IPv2DenoiseLib.core.errors import UserError


def test_names():
    assert DEVICE_CHOICES == ("auto", "cpu", "cuda", "mps")
    assert check_device_name(" CUDA:1 ") == "cuda:1"
    with pytest.raises(UserError, match="^--device 'gpu' is not one of auto, cpu, cuda, mps$"):
        check_device_name("gpu")


def test_resolve_within_the_callers_kinds():
    assert resolve_device(torch.device("cpu"), kinds=("cuda",)) == torch.device("cpu")
    assert resolve_device("auto", kinds=()) == torch.device("cpu")
    with pytest.raises(UserError, match="not supported here; use auto, cpu, cuda"):
        resolve_device("mps", kinds=("cuda",))
