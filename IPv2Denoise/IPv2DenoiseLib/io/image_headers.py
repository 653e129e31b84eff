"""Check what an NRRD, MetaImage (MHA/MHD) or NIfTI file declares before ITK allocates it.

ITK allocates the declared image size first and only then reads the data: a 131-byte gzip NRRD
declaring 4000 x 4000 x 200 floats makes it allocate 12.8 GB, a header declaring fewer slices
than its data holds reads silently (the rest is ignored), and an ``.mhd`` may name any data file
on the machine (``/etc/...``, ``../../x``). SimpleITK offers no way to read the header alone with
a limit, and pynrrd / nibabel are not dependencies (and would still not check a MetaImage), so
this module parses only the few fields that fix the data size and location:

* the declared size (voxels x bytes per value) against a memory budget
  (:func:`memory_budget_bytes`);
* raw data: the bytes in the file must be exactly the declared size;
* compressed data (gzip, bzip2, zlib): decompressed as a stream, without keeping it, and stopped
  one byte past the declared size: the sizes must match exactly;
* a detached data file (``.nhdr``, ``.mhd``) must lie in the header's own folder (no absolute
  path, no ``..``, no symlink out of it); data split over several files is refused.

The image is then read by SimpleITK as before.
"""

from __future__ import annotations

import bz2
import math
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from IPv2DenoiseLib.core.errors import UserError

#: Environment variable that sets the memory budget for one input image, in GB (default: the
#: memory available when the file is opened).
MEMORY_LIMIT_ENV = "IPV2_DENOISE_MEMORY_LIMIT_GB"
#: The most header bytes read before the data (NRRD and MetaImage headers are a few hundred).
MAX_HEADER_BYTES = 1 << 20
_CHUNK = 1 << 20

_NRRD_TYPES = {
    1: {"signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"},
    2: {"short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort"}
    | {"unsigned short", "unsigned short int", "uint16", "uint16_t"},
    4: {"int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"},
    8: {"longlong", "long long", "long long int", "signed long long", "signed long long int", "int64"}
    | {
        "int64_t",
        "ulonglong",
        "unsigned long long",
        "unsigned long long int",
        "uint64",
        "uint64_t",
        "double",
    },
}
_META_TYPES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
_NIFTI_TYPES = {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8}


@dataclass
class DeclaredImage:
    """Where an image file says its data is, and how much of it there must be.

    Attributes
    ----------
    path : pathlib.Path
        The header (or single) file.
    sizes : tuple of int
        Declared size per axis, as the header lists them.
    bytes_per_value : int
        Bytes per voxel value (all components).
    data_file : pathlib.Path
        The file holding the voxels (``path`` itself, or one beside it).
    data_offset : int or None
        Where the voxel data start in ``data_file``; None: they are its last bytes.
    encoding : str
        ``"raw"``, ``"gzip"``, ``"bzip2"``, ``"zlib"`` or ``"text"`` (size not checked exactly).
    skip_after_decoding : int
        Bytes before the image in the decoded stream (NRRD byte skip, gzipped NIfTI header).
    """

    path: Path
    sizes: tuple[int, ...]
    bytes_per_value: int
    data_file: Path
    data_offset: int | None  # None: the data are the last bytes of data_file
    encoding: str  # "raw", "gzip", "bzip2", "zlib" or "text"
    skip_after_decoding: int = 0  # bytes before the image in the decoded stream (NRRD byte skip, NIfTI gz)

    @property
    def voxels(self) -> int:
        return math.prod(self.sizes)

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.bytes_per_value


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def memory_budget_bytes() -> int:
    """The memory one input may take: ``$IPV2_DENOISE_MEMORY_LIMIT_GB`` GB, else what is available now.

    Returns
    -------
    int
        The budget, bytes.

    Raises
    ------
    UserError
        The environment variable is set but is not a positive number.
    """
    value = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if value:
        try:
            gb = float(value)
        except ValueError:
            raise UserError(f"{MEMORY_LIMIT_ENV}={value!r} is not a number of GB") from None
        if not gb > 0:
            raise UserError(f"{MEMORY_LIMIT_ENV}={value!r} must be a positive number of GB")
        return int(gb * 1e9)
    return int(psutil.virtual_memory().available)


def _header_lines(path: Path, magic_check) -> tuple[list[str], int]:
    """Text lines of the header and the offset just after it (a blank line, or ``magic_check`` stops)."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    lines, offset = [], 0
    while offset < len(head):
        end = head.find(b"\n", offset)
        if end < 0:
            end = len(head)
        raw = head[offset:end]
        offset = end + 1
        text = raw.decode("latin-1").rstrip("\r")
        lines.append(text)
        if magic_check(text):
            return lines, min(offset, len(head))
    return lines, -1


def _inside(folder: Path, name: str, *, what: str, header: Path) -> Path:
    """``folder / name``, refused unless it stays in ``folder`` (no absolute path, no '..', no symlink out)."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or not name.strip():
        raise UserError(
            f"{header}: its {what} {name!r} lies outside the header's folder; only a data file beside the "
            "header is read"
        )
    target = folder / candidate
    try:
        resolved, root = target.resolve(strict=False), folder.resolve()
    except (OSError, RuntimeError):
        raise UserError(f"{header}: its {what} {name!r} cannot be resolved (a symlink loop?)") from None
    if root not in resolved.parents:
        raise UserError(f"{header}: its {what} {name!r} is a link to {resolved}, outside the header's folder")
    return target


#: MetaImage fields this module reads, as MetaIO spells them: ITK matches field names exactly, so a
#: field spelled otherwise would be read here and skipped by ITK (which would then read another).
_META_FIELDS = {
    name.lower(): name
    for name in (
        "DimSize",
        "ElementType",
        "ElementDataFile",
        "ElementNumberOfChannels",
        "CompressedData",
        "BinaryData",
        "HeaderSize",
    )
}


def _header_fields(
    pairs: list[tuple[str, str]], *, path: Path, spelled: dict[str, str] | None = None
) -> dict:
    """``{lower-case key: value}`` of a header's ``key, value`` pairs, refusing a key given twice (in any
    case) and, with ``spelled``, a known key spelled otherwise: the check and the reader must read the
    same field."""
    fields: dict[str, str] = {}
    for key, value in pairs:
        key = key.strip()
        name = key.lower()
        if name in fields:
            raise UserError(
                f"{path}: its header gives the field {key!r} twice; refused (which one counts is unclear)"
            )
        if spelled and name in spelled and key != spelled[name]:
            raise UserError(f"{path}: its header field {key!r} is not spelled {spelled[name]!r}; refused")
        fields[name] = value.strip()
    return fields


def _whole_number(value: str, *, path: Path, what: str) -> int:
    """A header's integer field, or one line saying it is not one."""
    try:
        return int(value or 0)
    except ValueError:
        raise UserError(f"{path}: its {what} {value!r} is not a whole number") from None


def _nrrd(path: Path) -> DeclaredImage:
    lines, offset = _header_lines(path, lambda line: line == "")
    if not lines or not re.fullmatch(r"NRRD000\d", lines[0].strip()):
        raise UserError(f"{path}: not an NRRD file (it does not start with 'NRRD000x')")
    pairs = [tuple(line.split(": ", 1)) for line in lines[1:] if not line.startswith("#") and ": " in line]
    fields = _header_fields(pairs, path=path)
    for key in ("sizes", "type", "encoding"):
        if key not in fields:
            raise UserError(f"{path}: the NRRD header has no '{key}' field")
    sizes = _positive_ints(fields["sizes"].split(), path=path, what="sizes")
    kind = " ".join(fields["type"].lower().split())
    size = next((n for n, names in _NRRD_TYPES.items() if kind in names), None)
    if size is None:
        raise UserError(f"{path}: NRRD type '{fields['type']}' is not an image of numbers")
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(
        fields["encoding"].lower(), "text"
    )
    byte_skip = _whole_number(fields.get("byte skip", "0"), path=path, what="byte skip")
    if _whole_number(fields.get("line skip", "0"), path=path, what="line skip") != 0:
        encoding = "text"  # lines skipped before the data: size not checked exactly
    data_name = fields.get("data file", fields.get("datafile"))
    if data_name is None:
        if offset < 0:
            raise UserError(
                f"{path}: the NRRD header does not end (no blank line before the data); cut short?"
            )
        data_file, start = path, offset
    else:
        if data_name.split()[0].upper() == "LIST" or len(data_name.split()) > 1:
            raise UserError(
                f"{path}: data split over several files ({data_name!r}) is not read; join it into one .nrrd"
            )
        data_file, start = _inside(path.parent, data_name, what="data file", header=path), 0
    if encoding == "raw":
        return DeclaredImage(
            path, sizes, size, data_file, None if byte_skip == -1 else start + byte_skip, "raw"
        )
    return DeclaredImage(path, sizes, size, data_file, start, encoding, max(byte_skip, 0))


def _meta_image(path: Path) -> DeclaredImage:
    lines, offset = _header_lines(path, lambda line: line.split("=", 1)[0].strip() == "ElementDataFile")
    fields = _header_fields(
        [tuple(line.split("=", 1)) for line in lines if "=" in line], path=path, spelled=_META_FIELDS
    )
    if offset < 0 or "dimsize" not in fields:
        raise UserError(f"{path}: not a MetaImage header (no DimSize / ElementDataFile)")
    sizes = _positive_ints(fields["dimsize"].split(), path=path, what="DimSize")
    channels = _whole_number(
        fields.get("elementnumberofchannels", "1") or "1", path=path, what="ElementNumberOfChannels"
    )
    element_type = fields.get("elementtype", "").upper()
    if element_type not in _META_TYPES:
        raise UserError(
            f"{path}: MetaImage ElementType '{fields.get('elementtype', '')}' is not an image of numbers"
        )
    sizes = (*sizes, channels) if channels > 1 else sizes
    compressed = fields.get("compresseddata", "false").lower() == "true"
    binary = fields.get("binarydata", "true").lower() != "false"
    encoding = "zlib" if compressed else ("raw" if binary else "text")
    data_name = fields["elementdatafile"]
    if data_name.upper() == "LOCAL":
        data_file, start = path, offset
    else:
        if data_name.split()[0].upper() == "LIST" or len(data_name.split()) > 1:
            raise UserError(
                f"{path}: data split over several files ({data_name!r}) is not read; join it into one .mha"
            )
        data_file = _inside(path.parent, data_name, what="ElementDataFile", header=path)
        header_size = _whole_number(fields.get("headersize", "0"), path=path, what="HeaderSize")
        start = None if header_size == -1 else header_size
    return DeclaredImage(path, sizes, _META_TYPES[element_type], data_file, start, encoding)


def _nifti_header(head: bytes, path: Path) -> tuple[tuple[int, ...], int, int]:
    """(sizes, bytes per value, data offset) of a NIfTI-1 or NIfTI-2 header."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, _bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, _bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        raise UserError(f"{path}: not a NIfTI file (no NIfTI-1/2 header), or cut short in its header")
    if not 1 <= dims[0] <= 7 or datatype not in _NIFTI_TYPES:
        raise UserError(f"{path}: the NIfTI header is damaged (dim[0] {dims[0]}, datatype {datatype})")
    sizes = _positive_ints([str(d) for d in dims[1 : dims[0] + 1]], path=path, what="dim")
    return sizes, _NIFTI_TYPES[datatype], max(offset, 348)


def _nifti(path: Path) -> DeclaredImage:
    if path.name.lower().endswith(".gz"):
        head = b"".join(_decoded_chunks(path, 0, "gzip", limit=540))
        sizes, size, offset = _nifti_header(head, path)
        return DeclaredImage(path, sizes, size, path, 0, "gzip", offset)
    with open(path, "rb") as f:
        head = f.read(540)
    sizes, size, offset = _nifti_header(head, path)
    return DeclaredImage(path, sizes, size, path, offset, "raw")


def _positive_ints(values: list[str], *, path: Path, what: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        raise UserError(f"{path}: its {what} {' '.join(values)!r} are not whole numbers") from None
    if not numbers or min(numbers) < 1:
        raise UserError(f"{path}: its {what} {' '.join(values)!r} are not positive sizes")
    return numbers


def _decoded_chunks(path: Path, start: int, encoding: str, *, limit: int) -> Iterator[bytes]:
    """The decoded data of ``path`` from byte ``start``: at most ``limit`` bytes, never all in memory.

    Ends early where the file ends; several concatenated gzip members are one stream.
    """

    def decoder():
        return bz2.BZ2Decompressor() if encoding == "bzip2" else zlib.decompressobj(32 + zlib.MAX_WBITS)

    produced = 0
    with open(path, "rb") as f:
        f.seek(start)
        d, data = decoder(), f.read(_CHUNK)
        while produced < limit:
            if not data and (encoding != "bzip2" or d.needs_input):
                return  # the file ends (where a cut-short stream ends too)
            try:
                out = d.decompress(data, limit - produced)
            except (zlib.error, OSError, EOFError, ValueError) as exc:
                raise UserError(f"{path}: the compressed data are damaged ({exc})") from None
            produced += len(out)
            if out:
                yield out
            if d.eof:  # one stream ends; another gzip member may follow
                d, data = decoder(), d.unused_data or f.read(_CHUNK)
            elif encoding == "bzip2":
                data = f.read(_CHUNK) if d.needs_input else b""  # b"": output still buffered
            else:
                data = d.unconsumed_tail or f.read(_CHUNK)


def declared_image(path: Path) -> DeclaredImage | None:
    """What ``path`` declares, by its suffix (None for formats this module does not parse).

    Parameters
    ----------
    path : pathlib.Path
        An NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) or NIfTI (``.nii``,
        ``.nii.gz``) file.

    Returns
    -------
    DeclaredImage or None
        The declared size and data location; None for another suffix.

    Raises
    ------
    UserError
        A header that is malformed, cut short, or names a data file outside its folder.
    """
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd(path)
    if name.endswith((".mha", ".mhd")):
        return _meta_image(path)
    if name.endswith((".nii", ".nii.gz")):
        return _nifti(path)
    return None


def check_image_file(path: str | os.PathLike) -> DeclaredImage | None:
    """Refuse, in one line, an image file whose declared size does not fit memory or its data.

    Parameters
    ----------
    path : path-like
        The image file, before SimpleITK reads it.

    Returns
    -------
    DeclaredImage or None
        What it declares (None for a format not checked here).

    Raises
    ------
    UserError
        A bad header, a declared size above :func:`memory_budget_bytes`, a missing or unreadable
        data file, or data shorter (or, raw, longer) than declared.
    """
    path = Path(path)
    declared = declared_image(path)
    if declared is None:
        return None
    shape = " x ".join(str(s) for s in declared.sizes)
    needed = declared.voxels * (2 * declared.bytes_per_value + 4)  # ITK's image, its array, float32 HU
    budget = memory_budget_bytes()
    if needed > budget:
        raise UserError(
            f"{path}: declares {shape} values of {declared.bytes_per_value} bytes ({_gb(declared.data_bytes)}); "
            f"reading it needs about {_gb(needed)} of memory and {_gb(budget)} is available "
            f"(set {MEMORY_LIMIT_ENV} to change the limit)"
        )
    if declared.data_file != path and not declared.data_file.is_file():
        raise UserError(f"{path}: its data file {declared.data_file.name} is missing")
    try:
        size = declared.data_file.stat().st_size
    except OSError as exc:
        raise UserError(f"{declared.data_file}: cannot read it ({exc.strerror})") from None
    if declared.encoding == "raw":
        _check_raw(declared, shape, size)
    elif declared.encoding in ("gzip", "bzip2", "zlib"):
        expected = declared.skip_after_decoding + declared.data_bytes
        got = sum(
            len(c)
            for c in _decoded_chunks(
                declared.data_file, declared.data_offset or 0, declared.encoding, limit=expected + 1
            )
        )
        skip = declared.skip_after_decoding
        if got < expected:
            raise UserError(
                f"{path}: the header declares {shape} values ({declared.data_bytes} bytes) but the "
                f"{declared.encoding} data decompress to only {max(got - skip, 0)} bytes of image; the file is "
                "cut short or its header lies"
            )
        if got > expected:
            raise UserError(
                f"{path}: the {declared.encoding} data decompress to more than the {declared.data_bytes} bytes "
                f"the header declares ({shape} values); its header declares too few (slices left unread)"
            )
    return declared


def _check_raw(declared: DeclaredImage, shape: str, size: int) -> None:
    """Raw data: the data file holds exactly the declared bytes after the header (or at its end)."""
    expected = declared.data_bytes
    if declared.data_offset is None:
        got = size if size < expected else expected
        if size < expected:
            raise UserError(
                f"{declared.path}: the header declares {shape} values ({expected} bytes) but "
                f"{declared.data_file.name} holds only {got}; the file is cut short"
            )
        return
    got = size - declared.data_offset
    if got < expected:
        raise UserError(
            f"{declared.path}: the header declares {shape} values ({expected} bytes) but the file holds only "
            f"{max(got, 0)} bytes of data; the file is cut short"
        )
    if got > expected:
        raise UserError(
            f"{declared.path}: the file holds {got} bytes of data but the header declares {shape} values "
            f"({expected} bytes); its header declares too few (slices left unread)"
        )


__all__ = [
    "MEMORY_LIMIT_ENV",
    "DeclaredImage",
    "check_image_file",
    "declared_image",
    "memory_budget_bytes",
]
