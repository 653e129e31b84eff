"""Installing the Slicer module's Python packages (``slicer_support/dependencies.py``), outside Slicer:
``slicer.util.pip_install`` and ``slicer.packaging.pip_ensure`` are replaced by stand-ins that record
or fail as Slicer's would (``CalledProcessError`` without a network, ``RuntimeError`` when declined)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("slicer.util", reason="slicer-core not installed")
import slicer  # noqa: E402

from IPv2DenoiseLib.app.slicer_support import dependencies  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.dependencies import (  # noqa: E402
    REQUIREMENTS,
    TORCH_REQUIREMENT,
    DependencyError,
    ensure_in_slicer,
    missing_requirements,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
#: PyTorch's index of CPU-only wheels (also scripts/setup.sh's default TORCH_CPU_INDEX_URL).
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: A requirement no index holds: what the stand-ins "install".
MISSING = {"ipv2_test_missing_pkg": "ipv2-test-missing-pkg>=1.0"}


def _agree(text: str, details: str) -> bool:
    return True


def _decline(text: str, details: str) -> bool:
    return False


def _pip_fails(args: str) -> None:
    raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", args])


@pytest.fixture
def without_torch(monkeypatch):
    """torch looks absent until a stand-in pip_install "installs" it; no PyTorch extension; no GPU."""
    state = {"installed": False, "pip": []}
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "torch" and not state["installed"]:
            return None
        return real_find_spec(name, *args, **kwargs)

    def pip_install(args: str) -> None:
        state["pip"].append(args)
        state["installed"] = True

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # ``import PyTorchUtils`` raises ImportError
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(dependencies, "nvidia_gpu_present", lambda: False, raising=False)
    monkeypatch.setattr(dependencies, "REQUIREMENTS", {}, raising=True)
    monkeypatch.delenv("TORCH_CPU_INDEX_URL", raising=False)
    return state


def test_torch_without_the_extension_or_a_gpu_is_the_cpu_build(without_torch, monkeypatch) -> None:
    """Before, ``pip install "torch>=2.1"`` from PyPI: the multi-GB CUDA build on a CPU-only Linux."""
    monkeypatch.setattr("platform.system", lambda: "Linux")
    ensure_in_slicer(confirm=_agree)
    assert without_torch["pip"] == [f'"{TORCH_REQUIREMENT}" --extra-index-url {CPU_INDEX}']


def test_torch_with_an_nvidia_gpu_asks_for_the_pytorch_extension(without_torch, monkeypatch) -> None:
    monkeypatch.setattr(dependencies, "nvidia_gpu_present", lambda: True)
    with pytest.raises(DependencyError, match="install the PyTorch extension") as raised:
        ensure_in_slicer(confirm=_agree)
    assert without_torch["pip"] == [] and "\n" not in str(raised.value)


def test_torch_pip_args_follow_the_one_rule(monkeypatch) -> None:
    monkeypatch.delenv("TORCH_CPU_INDEX_URL", raising=False)
    cpu = dependencies.torch_pip_args(nvidia_gpu=False, system="Linux")
    assert cpu == f'"{TORCH_REQUIREMENT}" --extra-index-url {CPU_INDEX}'
    assert dependencies.torch_pip_args(nvidia_gpu=False, system="Windows") == cpu
    assert dependencies.torch_pip_args(nvidia_gpu=False, system="Darwin") == f'"{TORCH_REQUIREMENT}"'
    monkeypatch.setenv("TORCH_CPU_INDEX_URL", "https://mirror.example/torch-cpu")  # as for setup.sh
    assert dependencies.torch_pip_args(nvidia_gpu=False, system="Linux").endswith(
        "--extra-index-url https://mirror.example/torch-cpu"
    )
    with pytest.raises(DependencyError, match="PyTorch extension"):
        dependencies.torch_pip_args(nvidia_gpu=True, system="Linux")


def test_nvidia_gpu_present_asks_nvidia_smi_then_the_driver(tmp_path) -> None:
    def smi(code: int) -> str:
        path = tmp_path / f"nvidia-smi-{code}"
        path.write_text(f"#!/bin/sh\nexit {code}\n")
        path.chmod(0o755)
        return str(path)

    no_gpus, one_gpu = tmp_path / "none", tmp_path / "gpus"
    no_gpus.mkdir()
    (one_gpu / "0000:01:00.0").mkdir(parents=True)
    present = dependencies.nvidia_gpu_present
    assert present(which=lambda name: smi(0), driver_gpus=no_gpus)
    assert not present(which=lambda name: smi(1), driver_gpus=no_gpus)  # nvidia-smi, but no GPU answers
    assert present(which=lambda name: None, driver_gpus=one_gpu)
    assert not present(which=lambda name: None, driver_gpus=tmp_path / "absent")


def test_setup_script_uses_the_same_gpu_rule() -> None:
    script = (REPO / "scripts" / "setup.sh").read_text()
    assert "nvidia-smi -L" in script and str(dependencies.NVIDIA_DRIVER_GPUS) in script
    assert f"TORCH_CPU_INDEX_URL:-{CPU_INDEX}" in script and dependencies.TORCH_CPU_INDEX_URL == CPU_INDEX


def test_failed_torch_install_is_one_line_naming_torch(without_torch, monkeypatch) -> None:
    monkeypatch.setattr(slicer.util, "pip_install", _pip_fails)
    with pytest.raises(DependencyError) as raised:
        ensure_in_slicer(confirm=_agree)
    message = str(raised.value)
    assert TORCH_REQUIREMENT in message and "network or proxy" in message and "\n" not in message
    assert not raised.value.restart_required


def test_no_network_is_one_line_naming_the_packages(monkeypatch) -> None:
    """Slicer 5.10's pip_install without a network: before, "Command [...] returned non-zero exit
    status 1" reached the status label."""
    monkeypatch.setattr(dependencies, "REQUIREMENTS", MISSING)
    monkeypatch.setattr(slicer, "packaging", None, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", _pip_fails)
    with pytest.raises(DependencyError) as raised:
        ensure_in_slicer(confirm=_agree)
    message = str(raised.value)
    assert message.startswith("could not install ipv2-test-missing-pkg>=1.0: ")
    assert "network or proxy" in message and "wheelhouse" in message and "docs/slicer-module.md" in message
    assert "Command" not in message and "\n" not in message and not raised.value.restart_required


def test_declined_in_pip_ensure_is_one_line(monkeypatch) -> None:
    """Slicer >= 5.12's pip_ensure raises RuntimeError("User declined package installation")."""

    def pip_ensure(requirements, **kwargs) -> None:
        raise RuntimeError("User declined package installation")

    monkeypatch.setattr(dependencies, "REQUIREMENTS", MISSING)
    monkeypatch.setattr(slicer, "packaging", SimpleNamespace(pip_ensure=pip_ensure), raising=False)
    with pytest.raises(DependencyError, match=r"needs ipv2-test-missing-pkg>=1.0 \(installation declined"):
        ensure_in_slicer(confirm=_agree)


def test_failed_pip_ensure_is_one_line(monkeypatch) -> None:
    def pip_ensure(requirements, **kwargs) -> None:
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip"])

    monkeypatch.setattr(dependencies, "REQUIREMENTS", MISSING)
    monkeypatch.setattr(slicer, "packaging", SimpleNamespace(pip_ensure=pip_ensure), raising=False)
    with pytest.raises(DependencyError, match="could not install ipv2-test-missing-pkg>=1.0: pip failed"):
        ensure_in_slicer(confirm=_agree)


def test_declined_confirmation_installs_nothing(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(dependencies, "REQUIREMENTS", MISSING)
    monkeypatch.setattr(slicer, "packaging", None, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", calls.append)
    with pytest.raises(DependencyError, match="installation declined"):
        ensure_in_slicer(confirm=_decline)
    assert calls == []


def test_installed_but_not_importable_asks_for_a_restart(monkeypatch) -> None:
    monkeypatch.setattr(dependencies, "REQUIREMENTS", MISSING)
    monkeypatch.setattr(slicer, "packaging", None, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: None)
    with pytest.raises(DependencyError, match="restart Slicer") as raised:
        ensure_in_slicer(confirm=_agree)
    assert raised.value.restart_required


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]


def test_requirements_are_one_list_pinned_as_in_pyproject() -> None:
    """REQUIREMENTS is the one list (no stale Resources/requirements.txt beside it), pinned as
    pyproject.toml pins the same packages."""
    assert not (REPO / "Resources" / "requirements.txt").exists()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(REQUIREMENTS.values()) | {TORCH_REQUIREMENT} <= set(declared)


def test_the_slicer_doc_names_every_package_installed_at_apply() -> None:
    doc = (REPO / "docs" / "slicer-module.md").read_text()
    paragraph = doc[doc.index("**Python packages.**") :].split("\n\n", 1)[0]
    missing = [_distribution(r) for r in REQUIREMENTS.values() if _distribution(r) not in paragraph]
    assert not missing, f"docs/slicer-module.md, 'Python packages', does not name {missing}"


def test_slicers_pip_ensure_gets_requirement_objects_from_pydeps(monkeypatch) -> None:
    """Current Slicer's ``slicer.pydeps.pip_ensure`` takes ``packaging`` Requirement objects and the
    packages it must never replace; the module called ``slicer.packaging.pip_ensure`` with strings."""
    from packaging.requirements import Requirement

    calls = []

    def pip_ensure(requirements, **kwargs) -> None:
        calls.append((requirements, kwargs))

    monkeypatch.setattr(dependencies, "REQUIREMENTS", MISSING)
    monkeypatch.setattr(slicer, "packaging", None, raising=False)
    monkeypatch.setattr(slicer, "pydeps", SimpleNamespace(pip_ensure=pip_ensure), raising=False)
    with pytest.raises(DependencyError, match="restart Slicer"):  # the stand-in installs nothing
        ensure_in_slicer(confirm=_agree)
    ((requirements, kwargs),) = calls
    assert all(isinstance(r, Requirement) for r in requirements)
    assert [str(r) for r in requirements] == list(MISSING.values())
    assert kwargs["skip_packages"] == dependencies.SKIP_PACKAGES and kwargs["requester"] == "IPv2 Denoise"


def test_a_package_older_than_required_counts_as_missing(monkeypatch) -> None:
    """Slicer 5.10 bundles pydicom 2.4, which cannot write the derived series (``save_as`` has no
    ``enforce_file_format``): an importable but older package must be installed anew, not taken."""
    import numpy

    monkeypatch.setattr(
        dependencies, "REQUIREMENTS", {"numpy": f"numpy>{numpy.__version__}", "pydicom": "pydicom>=3.0"}
    )
    assert missing_requirements(include_torch=False) == [f"numpy>{numpy.__version__}"]
    assert dependencies.REQUIREMENTS["pydicom"] == "pydicom>=3.0"
