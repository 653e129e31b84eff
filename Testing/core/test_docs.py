"""Docs that are true: no pointer to files outside the repository, links that resolve, and every
module of the package named in docs/architecture.md (issue #22)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "IPv2Denoise" / "IPv2DenoiseLib"
ARCHITECTURE = REPO / "docs" / "architecture.md"

#: Files that only a past session's working folder had: a reader of the repository cannot open them.
OUTSIDE = re.compile(r"DESIGN\.md|\breference/[\w-]+\.md|ldct-anchors|slicer-conventions|ipv2-method\.md")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in out.stdout.split() if (REPO / line).exists()]


def test_no_reference_to_files_outside_the_repository() -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in tracked("*.py", "*.md", "*.toml", "*.sh", "*.txt")
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if OUTSIDE.search(line) and path.name != "test_docs.py"
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "page", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files: {broken}"


def test_every_module_is_named_in_architecture() -> None:
    """Each module by its path below the package (``core/display.py``), or a whole sub-package by
    its folder (``denoiser/models/``, ``app/commands/``) with the module's file name."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = []
    for module in sorted(PACKAGE.rglob("*.py")):
        rel = module.relative_to(PACKAGE).as_posix()
        if module.name in ("__init__.py", "__main__.py") or "/" not in rel:
            continue
        folder = rel.rsplit("/", 1)[0] + "/"
        if rel in text or (folder.count("/") > 1 and folder in text and module.name in text):
            continue
        missing.append(rel)
    assert not missing, f"docs/architecture.md does not name: {missing}"
