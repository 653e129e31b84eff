"""``core/paths.py``: untrusted text never becomes a path outside the output folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.paths import MAX_COMPONENT_BYTES, path_inside, safe_component, safe_relative


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.2.840.113619.2.1", "1.2.840.113619.2.1"),  # a real UID stays as it is
        ("Patient 01", "Patient 01"),
        ("..", "__"),
        (".", "_"),
        ("", "_"),
        ("../../etc/passwd", "___.._etc_passwd"),
        ("/abs", "_abs"),
        ("a\\b", "a_b"),
        ("x\x00y\nz", "x_y_z"),
        (".ipv2-batch", "_ipv2-batch"),  # no hidden names: the batch's state folder stays its own
    ],
)
def test_safe_component(text: str, expected: str) -> None:
    assert safe_component(text) == expected
    assert safe_component(expected) == expected  # idempotent


def test_long_component_is_cut_with_a_hash() -> None:
    a, b = safe_component("x" * 400), safe_component("x" * 399 + "y")
    assert a != b and len(a.encode()) <= MAX_COMPONENT_BYTES and len(b.encode()) <= MAX_COMPONENT_BYTES


def test_safe_relative_drops_climbing_parts() -> None:
    assert safe_relative("site/../../../x/victim") == "site/x/victim"
    assert safe_relative("/etc/passwd") == "etc/passwd"
    assert safe_relative("a/.hidden/./b") == "a/_hidden/b"
    assert safe_relative("../..") == "_"


def test_path_inside_resolves_symlinks(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    assert path_inside(out, out / "a" / "b.nrrd") == (out / "a" / "b.nrrd").resolve()
    os.symlink(elsewhere, out / "link")
    for bad in (out / "link" / "x.nrrd", out / ".." / "x", Path("/etc/passwd"), out):
        with pytest.raises(UserError, match="outside the output folder"):
            path_inside(out, bad)
