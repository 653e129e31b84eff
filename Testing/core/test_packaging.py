"""What ``pip install .`` and the sdist install: the package with its ``Resources/`` (the weights that
``models.json`` names, their cards, the sample scans), found by ``core/resources.py`` outside the
checkout. Before, a wheel held only ``.py`` files and ``ipv2-denoise demo`` failed "cannot find the
IPv2Denoise Resources folder"."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "IPv2Denoise" / "IPv2DenoiseLib"
#: Where a wheel puts ``<repo>/Resources`` (pyproject.toml, [tool.setuptools] package-dir).
WHEEL_RESOURCES = "IPv2DenoiseLib/Resources"


def _sub_packages() -> set[str]:
    """Dotted names of the package and every sub-package in the checkout."""
    return {".".join(init.parent.relative_to(PACKAGE.parent).parts) for init in PACKAGE.rglob("__init__.py")}


def test_pyproject_lists_every_sub_package() -> None:
    """The packages are listed in pyproject.toml (discovery cannot see the mapped Resources); a new
    sub-package missing from the list would be missing from every wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(_sub_packages() - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    resources = {name for name in listed if name.startswith("IPv2DenoiseLib.Resources")}
    folders = {"IPv2DenoiseLib.Resources"} | {
        f"IPv2DenoiseLib.Resources.{p.name}" for p in (REPO / "Resources").iterdir() if p.is_dir()
    }
    assert resources == folders, "Resources/ folders and pyproject.toml's IPv2DenoiseLib.Resources.* differ"


def _copy_source(dest: Path) -> Path:
    """The files pyproject.toml builds from, without build leftovers of the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(PACKAGE, dest / "IPv2Denoise" / PACKAGE.name, ignore=ignore)
    shutil.copytree(REPO / "Resources", dest / "Resources", ignore=ignore)
    return dest


def _build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
        + ["--no-index", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("ipv2_denoise-*.whl")
    return wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A wheel built as ``pip install .`` builds it, the sdist, and a wheel built from that sdist."""
    root = tmp_path_factory.mktemp("packaging")
    source = _copy_source(root / "source")
    sdist_dir = root / "sdist"
    build_sdist = f"from setuptools import build_meta; build_meta.build_sdist({str(sdist_dir)!r})"
    subprocess.run(
        [sys.executable, "-c", build_sdist], cwd=source, check=True, capture_output=True, timeout=300
    )
    (sdist,) = sdist_dir.glob("ipv2_denoise-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    return {
        "wheel": _build_wheel(source, root / "wheel"),
        "sdist": sdist,
        "sdist_wheel": _build_wheel(unpacked, root / "sdist_wheel"),
    }


def test_wheel_carries_models_json_its_weights_cards_and_the_sample(built) -> None:
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        catalogue = json.loads(wheel.read(f"{WHEEL_RESOURCES}/Models/models.json"))
        default = catalogue["models"][catalogue["default"]]
        weights = wheel.read(f"{WHEEL_RESOURCES}/Models/{default['file']}")
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert hashlib.sha256(weights).hexdigest() == default["sha256"]  # the real weights, not a pointer
    for entry in catalogue["models"].values():
        assert f"{WHEEL_RESOURCES}/Models/{entry['file']}" in names
        assert f"{WHEEL_RESOURCES}/Models/{Path(entry['file']).with_suffix('.json')}" in names  # card
    for sample in sorted((REPO / "Resources" / "SampleData").iterdir()):
        assert f"{WHEEL_RESOURCES}/SampleData/{sample.name}" in names
    assert f"{WHEEL_RESOURCES}/UI/IPv2Denoise.ui" in names
    sources = {f"IPv2DenoiseLib/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
    assert not sources - names, f"modules missing from the wheel: {sorted(sources - names)[:5]}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata


def test_sdist_carries_the_resources_and_builds_the_same_wheel(built) -> None:
    with tarfile.open(built["sdist"]) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "Resources/Models/models.json", "Resources/SampleData/sample_uldct.nrrd"} <= members
    with zipfile.ZipFile(built["wheel"]) as tree, zipfile.ZipFile(built["sdist_wheel"]) as from_sdist:
        assert set(from_sdist.namelist()) == set(tree.namelist())


def test_installed_wheel_finds_its_own_models_and_sample(built, tmp_path) -> None:
    """The wheel in a fresh venv, run from outside the checkout: the CLI starts, and the catalogue,
    the default weights and the demo's sample resolve inside that venv (the dependencies come from
    this interpreter's site-packages, read as plain paths so this checkout's editable install is not)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "zz_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
        + [str(built["wheel"])],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cli = python.with_name("ipv2-denoise.exe" if os.name == "nt" else "ipv2-denoise")
    helped = subprocess.run(
        [str(cli), "demo", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "usage: ipv2-denoise demo" in helped.stdout, helped.stderr
    probe = (
        "import json, IPv2DenoiseLib\n"
        "from IPv2DenoiseLib.core.resources import resources_dir\n"
        "from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue\n"
        "from IPv2DenoiseLib.app.commands.demo import sample_uldct\n"
        "entry = ModelCatalogue.read().entry()\n"
        "print(json.dumps({'package': IPv2DenoiseLib.__file__, 'resources': str(resources_dir()),"
        " 'weights': str(entry.weights), 'exists': entry.weights.is_file(), 'sample': str(sample_uldct())}))\n"
    )
    done = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["package"]).is_relative_to(Path(purelib))
    assert Path(found["resources"]) == Path(purelib) / WHEEL_RESOURCES
    assert found["exists"] and Path(found["weights"]).is_relative_to(Path(found["resources"]))
    assert Path(found["sample"]).is_relative_to(Path(found["resources"]))
