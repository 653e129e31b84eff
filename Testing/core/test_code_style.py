"""The repository is ``ruff check`` and ``ruff format`` clean (config in pyproject.toml), so CI checks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
    """ruff from the test extra: beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed; it is in the test extra (pip install -e '.[test]')")
    return [found]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_clean(args):
    result = subprocess.run([*_ruff(), *args, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _function_with_branches(name: str, branches: int) -> str:
    """Source of a function of McCabe complexity ``branches + 1`` (one ``if`` per branch)."""
    body = "".join(f"    if x == {k}:\n        return {k}\n" for k in range(branches))
    return f"def {name}(x: int) -> int:\n{body}    return -1\n"


def test_ruff_check_refuses_a_function_above_complexity_12(tmp_path):
    """The repository's ruff config selects C901 at 12, so ``test_ruff_clean`` fails on a function of 13."""
    allowed = tmp_path / "allowed.py"
    allowed.write_text(_function_with_branches("twelve", 11))
    too_complex = tmp_path / "too_complex.py"
    too_complex.write_text(_function_with_branches("thirteen", 12))
    config = ["--config", str(REPO / "pyproject.toml"), "--no-cache", "--output-format", "concise"]

    ok = subprocess.run([*_ruff(), "check", *config, str(allowed)], capture_output=True, text=True)
    refused = subprocess.run([*_ruff(), "check", *config, str(too_complex)], capture_output=True, text=True)

    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "C901 `thirteen` is too complex (13 > 12)" in refused.stdout
