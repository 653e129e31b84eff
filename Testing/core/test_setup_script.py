"""``scripts/setup.sh`` on a machine where ``python3 -m venv`` fails half-way (Debian/Ubuntu without
python3-venv: ``bin/python`` written, ``bin/activate`` not). Run with stand-ins for Python, pip, apt-get
and ``id`` on PATH, so nothing is installed and it takes a second."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: A Python stand-in: logs its arguments; ``-m venv [--clear] DIR`` fails while $FAIL_VENV_TIMES > 0
#: (after writing bin/python, as a Python without ensurepip does), else makes a venv whose bin/activate
#: puts stand-ins for python and pip (log, exit 0) first on PATH.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "python3 $*" >> "$LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  dir="${@: -1}"
  [ "$3" = --clear ] && rm -rf "$dir"
  mkdir -p "$dir/bin"
  printf '#!/usr/bin/env bash\necho "$(basename "$0") $*" >> "$LOG"\n' > "$dir/bin/python"
  cp "$dir/bin/python" "$dir/bin/pip"
  chmod +x "$dir/bin/python" "$dir/bin/pip"
  left=$(cat "$FAIL_VENV_TIMES")
  if [ "$left" -gt 0 ]; then echo $((left - 1)) > "$FAIL_VENV_TIMES"; exit 1; fi
  echo "PATH=\"$PWD/$dir/bin:\$PATH\"" > "$dir/bin/activate"
fi
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def checkout(tmp_path: Path) -> dict:
    """A checkout holding only scripts/setup.sh, and stand-ins: python3, id (root or not), apt-get."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "python3", FAKE_PYTHON)
    _executable(bin_dir / "apt-get", '#!/usr/bin/env bash\necho "apt-get $*" >> "$LOG"\n')
    log, fail = tmp_path / "log", tmp_path / "fail_venv_times"
    log.write_text("")
    fail.write_text("0")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python3"),
        "LOG": str(log),
        "FAIL_VENV_TIMES": str(fail),
    }
    return {"repo": repo, "bin": bin_dir, "log": log, "fail": fail, "env": env}


def _run(checkout: dict, uid: int) -> subprocess.CompletedProcess:
    _executable(checkout["bin"] / "id", f"#!/usr/bin/env bash\necho {uid}\n")
    return subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=checkout["repo"],
        env=checkout["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rerun_remakes_a_half_made_venv(checkout) -> None:
    """The first run died after ``python3 -m venv`` wrote bin/python; the rerun makes the venv again
    (before, it saw bin/python, skipped the venv and died at ``. .venv/bin/activate``)."""
    half = checkout["repo"] / ".venv" / "bin"
    half.mkdir(parents=True)
    _executable(half / "python", "#!/bin/sh\nexit 1\n")
    done = _run(checkout, uid=1000)
    assert done.returncode == 0, done.stderr
    log = checkout["log"].read_text()
    assert "python3 -m venv --clear .venv" in log and "pip install -q -e ." in log
    assert (checkout["repo"] / ".venv" / "bin" / "activate").is_file()


def test_without_python3_venv_and_not_root_one_line_names_the_package(checkout) -> None:
    checkout["fail"].write_text("9")
    done = _run(checkout, uid=1000)
    assert done.returncode == 2
    assert "apt-get install -y python3-venv" in done.stderr.splitlines()[0]
    assert "apt-get" not in checkout["log"].read_text()


def test_as_root_python3_venv_is_installed_with_apt_and_the_venv_made(checkout) -> None:
    checkout["fail"].write_text("1")
    done = _run(checkout, uid=0)
    assert done.returncode == 0, done.stderr
    log = checkout["log"].read_text()
    assert "apt-get install -y -qq --no-install-recommends python3-venv" in log
    assert log.count("python3 -m venv --clear .venv") == 2
