"""Convert an InVesalius project (``.inv3``) into an NRRD volume in HU, for ``train --anatomy``.

Debian's ``invesalius-examples`` ships a real head CT as
``/usr/share/doc/invesalius-examples/examples/Cranium.inv3``: a gzipped tar whose ``main.plist``
describes ``matrix.dat`` (raw int16 HU, shape ``[z, y, x]``, ``spacing`` x, y, z in mm). The
archive is read in memory (nothing is extracted, so no member name ever becomes a path) and every
value of the plist is checked before use. A converter rather than a reader in ``io/``: ``.inv3``
is a project format of one program, met once when a training corpus is assembled.

Usage::

    python scripts/inv3_to_nrrd.py /usr/share/doc/invesalius-examples/examples/Cranium.inv3 \
        runs/corpus/head_cranium.nrrd
"""

from __future__ import annotations

import argparse
import plistlib
import sys
import tarfile
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import write_volume

#: Raw sample types InVesalius writes for CT matrices.
ALLOWED_DTYPES = ("int16", "uint16", "int32", "float32")
#: Largest matrix accepted (voxels): refuses a plist that would make us allocate absurd sizes.
MAX_VOXELS = 2_000_000_000


def _member(archive: tarfile.TarFile, basename: str) -> bytes:
    """The bytes of the regular-file member whose last path component is ``basename``."""
    for info in archive.getmembers():
        if info.isfile() and info.name.replace("\\", "/").rsplit("/", 1)[-1] == basename:
            handle = archive.extractfile(info)
            if handle is not None:
                return handle.read()
    raise UserError(f"the .inv3 archive holds no {basename}")


def read_inv3(path: str | Path) -> Volume:
    """The CT matrix of an InVesalius project as a :class:`Volume` (float32 HU, spacing in mm)."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            plist = plistlib.loads(_member(archive, "main.plist"))
            matrix = plist.get("matrix") or {}
            filename = str(matrix.get("filename", ""))
            if not filename or "/" in filename or "\\" in filename:
                raise UserError(f"{path}: main.plist names no plain matrix file ({filename!r})")
            raw = _member(archive, filename)
    except (tarfile.TarError, OSError, plistlib.InvalidFileException) as exc:
        raise UserError(f"{path}: not a readable .inv3 archive ({exc})") from None
    dtype = str(matrix.get("dtype", ""))
    shape = tuple(int(s) for s in matrix.get("shape", ()))
    spacing = tuple(float(s) for s in plist.get("spacing", ()))
    if plist.get("modality", "CT") != "CT":
        raise UserError(f"{path}: modality {plist.get('modality')!r}, not CT")
    if dtype not in ALLOWED_DTYPES:
        raise UserError(f"{path}: matrix dtype {dtype!r} is not one of {', '.join(ALLOWED_DTYPES)}")
    if len(shape) != 3 or min(shape) < 1 or int(np.prod(shape)) > MAX_VOXELS:
        raise UserError(f"{path}: matrix shape {shape} is not a 3-D volume")
    if len(spacing) != 3 or not all(0.05 < s < 20.0 for s in spacing):
        raise UserError(f"{path}: spacing {spacing} is not three pixel sizes in mm")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: {filename} has {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return Volume(array.astype(np.float32), spacing=spacing, meta={"source": str(path)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inv3", help="InVesalius project file (.inv3)")
    parser.add_argument("out", help="output volume (.nrrd, .nii.gz or .mha); must not exist")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists():
            raise UserError(f"{out} exists; choose another output")
        volume = read_inv3(args.inv3)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_volume(volume, out, dtype=np.int16)
    except UserError as exc:
        print(f"inv3_to_nrrd: error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {volume.shape} voxels at {volume.spacing} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
