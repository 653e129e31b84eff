"""Find the cases of an archive: every DICOM series and every volume file of a folder tree, or a CSV manifest.

A case is one study to denoise. Its ``case_id`` is a POSIX path relative to the input root (the
series folder, or the volume file without its suffix); outputs and done records are named after
it, so the output tree mirrors the input tree. Every part of an id passes through
:func:`~IPv2DenoiseLib.core.paths.safe_component` (a SeriesInstanceUID or a manifest's ``case``
is data, never a path: ``..``, ``/`` and hidden names cannot reach the output tree). Cases are
sorted by ``case_id``; ``--shard K/N`` assigns each case by a hash of its id, so a case keeps its
shard however the rest of the archive changes.

A volume whose header names a detached data file (an ``.mhd``'s ``ElementDataFile``, an ``.nhdr``'s
``data file``) has that file among its ``files``: it is fingerprinted (a changed ``.raw`` makes the
case run again) and no output may land on it. The header is parsed by the reader's own check
(:func:`~IPv2DenoiseLib.io.image_headers.declared_image`), which refuses a data file outside the
header's folder: such a case fails with that line at discovery.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from IPv2DenoiseLib.app.batch.records import output_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.paths import safe_component, safe_relative
from IPv2DenoiseLib.io.dicom_series import SeriesInfo, series_of_files
from IPv2DenoiseLib.io.image_headers import declared_image
from IPv2DenoiseLib.io.volumes import image_suffix, may_be_dicom

#: Folders never searched for studies (besides hidden ones, whose names start with a dot).
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "venv"})
#: Columns a manifest may have (``path`` and/or ``series_uid`` per row; ``case`` names the output).
MANIFEST_COLUMNS = ("path", "series_uid", "case")


@dataclass(frozen=True)
class Case:
    """One study: a DICOM series (``kind="dicom"``, its files) or a volume file (``kind="volume"``).

    ``error`` is set when the case could not even be located (a manifest row naming a missing
    file or an unknown series); such a case is recorded as failed without being read.
    """

    case_id: str
    kind: str
    files: tuple[str, ...] = ()
    series_uid: str = ""
    source: str = ""
    error: str = ""

    def fingerprint(self) -> str:
        """sha256 over name, size and modification time of every input file (cheap; no reading).

        A done record only counts while the input still has this fingerprint.
        """
        digest = hashlib.sha256(self.kind.encode())
        for name in sorted(self.files):
            stat = os.stat(name)
            digest.update(f"\0{Path(name).name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


#: Suffixes whose header may name a detached data file (NRRD ``data file``, MetaImage ``ElementDataFile``).
DETACHED_SUFFIXES = (".nhdr", ".nrrd", ".mhd", ".mha")
#: Most header bytes scanned for a data-file field (headers are a few hundred bytes; the data follow).
_HEADER_SCAN_BYTES = 1 << 16
_DATA_FILE_FIELD = re.compile(rb"^(data ?file:|ElementDataFile\s*=)", re.IGNORECASE | re.MULTILINE)


def _may_name_data_file(path: Path) -> bool:
    """Whether the header of ``path`` may name a data file of its own (cheap: the first 64 KiB only;
    an ``.mhd`` / ``.nhdr`` always counts, an ``.nrrd`` / ``.mha`` when the field appears there)."""
    if path.name.lower().endswith((".nhdr", ".mhd")):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_SCAN_BYTES)
    except OSError:
        return False  # the reader reports it
    for match in _DATA_FILE_FIELD.finditer(head):
        end = head.find(b"\n", match.end())
        value = head[match.end() : end if end >= 0 else len(head)].strip()
        if value.upper() != b"LOCAL":
            return True
    return False


def volume_case(case_id: str, path: str | os.PathLike, *, source: str = "") -> Case:
    """The case of one volume file: its header and, when the header names one, its data file.

    Parameters
    ----------
    case_id : str
        The case's id.
    path : path-like
        The NRRD / NIfTI / MetaImage file.
    source : str
        The ``input`` column (default: ``path``).

    Returns
    -------
    Case
        ``kind="volume"`` with ``files`` = (header, data file) or (file,); with ``error`` set when
        the header names a data file outside its folder, data split over several files, or a data
        file that is missing (the reader would refuse it too: one line, the case is never read).
    """
    path = Path(path)
    case = Case(case_id, "volume", (str(path),), source=source or str(path))
    if image_suffix(path) not in DETACHED_SUFFIXES or not _may_name_data_file(path):
        return case
    try:
        declared = declared_image(path)
    except UserError as exc:
        return replace(case, error=str(exc))
    except OSError as exc:  # unreadable header: the reader says so in its own words
        return replace(case, error=f"{path}: cannot read it ({exc.strerror or exc})")
    if declared is None or declared.data_file == path:
        return case
    if not declared.data_file.is_file():
        return replace(case, error=f"{path}: its data file {declared.data_file.name} is missing")
    return replace(case, files=(str(path), str(declared.data_file)))


def _relative_id(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX id (a path outside ``root`` keeps its absolute form
    without the leading slash); never with ``..``, so outputs stay inside OUT."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix().lstrip("/")
    return safe_relative(rel if rel not in ("", ".") else path.name or "case")


def _checked_name(name: str, where: str) -> str:
    """A manifest's ``case`` name as an id: relative, no ``..``, every part a safe component."""
    parts = [p for p in name.replace("\\", "/").split("/") if p.strip() not in ("", ".")]
    if not parts or ".." in (p.strip() for p in parts) or name.startswith(("/", "\\")):
        raise UserError(f"{where}: case name {name!r} must be a relative path without '..'")
    return "/".join(safe_component(p) for p in parts)


def _volume_id(path: Path, root: Path) -> str:
    rel = _relative_id(path, root)
    suffix = image_suffix(path)
    return rel[: -len(suffix)] if suffix and rel.lower().endswith(suffix) else rel


#: One DICOM series of an archive: (SeriesInstanceUID, its files, why it cannot be a case or "").
Series = tuple[str, list[Path], str]


def _series_cases(series: list[Series], root: Path, *, source: str = "") -> list[Case]:
    """One case per series; the id is the series folder, plus the SeriesInstanceUID when a folder holds several."""
    folders = [Path(os.path.commonpath([str(f.parent) for f in files])) for _, files, _ in series]
    per_folder = Counter(folders)
    cases = []
    for (uid, files, problem), folder in zip(series, folders):
        case_id = _relative_id(folder, root)
        if per_folder[folder] > 1:
            case_id = f"{case_id}/{safe_component(uid)}"  # a tag value: never a path
        files = tuple(sorted(str(f) for f in files))
        cases.append(Case(case_id, "dicom", files, uid, source or str(folder), error=problem))
    return cases


def _unique_ids(cases: list[Case]) -> list[Case]:
    """Make every id a safe relative path, sort by id and make ids unique (a later duplicate gets
    a short hash of its first file, and a counter should that be taken too), and keep outputs from
    nesting (see :func:`_unnest`). A folder that could not be listed never takes a study's id."""
    cases = sorted(
        (replace(c, case_id=safe_relative(c.case_id)) for c in cases),
        key=lambda c: (c.case_id, c.kind == UNLISTED, c.files, c.source),
    )
    seen: set[str] = set()
    out = []
    for case in cases:
        case_id = case.case_id
        if case_id in seen:
            tag = hashlib.sha1((case.files[0] if case.files else case.source).encode()).hexdigest()[:8]
            case_id, count = f"{case.case_id}-{tag}", 1
            while case_id in seen:  # the same first file twice (a manifest naming one file twice)
                count += 1
                case_id = f"{case.case_id}-{tag}-{count}"
        seen.add(case_id)
        out.append(replace(case, case_id=case_id))
    return sorted(_unnest(out), key=lambda c: c.case_id)


def _unnest(cases: list[Case]) -> list[Case]:
    """A case whose id is a folder of another case's id (a series in ``p/`` and one in ``p/sub/``)
    goes one level down, ``p/<its SeriesInstanceUID or file name>``: with ``--dicom`` its output
    folder would otherwise hold the other's output, and replacing it would delete that."""
    parents = {
        str(parent)
        for c in cases
        if c.kind != UNLISTED  # an unlisted folder writes nothing: it cannot hold another output
        for parent in Path(c.case_id).parents
        if str(parent) != "."
    }
    taken = {c.case_id for c in cases}
    out = []
    for case in cases:
        if case.case_id in parents:
            leaf = safe_component(case.series_uid or Path(case.source or case.case_id).name)
            case_id = f"{case.case_id}/{leaf}"
            while case_id in taken:
                case_id += "_"
            taken.add(case_id)
            case = replace(case, case_id=case_id)
        out.append(case)
    return out


def walk_files(
    root: Path, *, exclude: Path | None = None, unlisted: list[OSError] | None = None
) -> list[Path]:
    """Every non-hidden file under ``root``, skipping hidden folders, :data:`SKIP_DIRS` and ``exclude``.

    A folder that cannot be listed (no permission, an I/O error) is appended to ``unlisted`` as its
    :class:`OSError` (``filename`` is the folder); without ``unlisted`` it is skipped silently.
    """
    root = Path(root)
    excluded = exclude.resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(
        root, onerror=unlisted.append if unlisted is not None else None
    ):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d not in SKIP_DIRS and (here / d).resolve() != excluded
        )
        found.extend(here / name for name in sorted(filenames) if not name.startswith("."))
    return found


def _slice_keys(info: SeriesInfo) -> set[str]:
    """What two copies of one slice share: its SOPInstanceUID and its position."""
    keys = set()
    for header in info.headers:
        if header.get("SOPInstanceUID"):
            keys.add(f"sop {header.SOPInstanceUID}")
        try:
            keys.add("position " + " ".join(f"{float(v):.3f}" for v in header.ImagePositionPatient))
        except (AttributeError, TypeError, ValueError):  # multi-frame or no position: by SOP UID only
            pass
    return keys


def _group_by_folder(files: Iterable[Path]) -> list[Series]:
    """The DICOM image series among ``files``, grouped one folder at a time (headers of one folder
    in memory at once) and merged by SeriesInstanceUID across folders, unless two folders hold the
    same slice (the same SOPInstanceUID or position: a stray copy, or another acquisition under a
    reused UID). Then each folder's part stays a case of its own, so a bad copy fails alone, named
    by its folder, and does not take the healthy series with it."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for f in files:
        by_folder[f.parent].append(f)
    parts: dict[str, list[tuple[list[Path], set[str]]]] = defaultdict(list)
    for folder in sorted(by_folder):
        for info in series_of_files(by_folder[folder]):
            parts[info.uid].append((list(info.files), _slice_keys(info)))
    series: list[Series] = []
    for uid, pieces in parts.items():
        seen: set[str] = set()
        clash = False
        for _, keys in pieces:
            clash = clash or not seen.isdisjoint(keys)
            seen |= keys
        if clash:
            problem = _partial_copies_problem(uid, pieces)
            series.extend((uid, files, problem) for files, _ in pieces)
        else:
            series.append((uid, [f for files, _ in pieces for f in files], ""))
    return series


def _partial_copies_problem(uid: str, pieces: list[tuple[list[Path], set[str]]]) -> str:
    """Why folders holding parts of one series that share instances cannot be cases, or "".

    Two folders with the same SOPInstanceUIDs hold copies of the same instances. When one of them
    holds every instance any of them holds, it is the series and the others are stray copies, each
    a case of its own (a bad copy fails alone). When none does (a transfer stopped after slice 200
    in one folder, a resend of 190-300 in another), each part would be denoised as a whole-looking
    but shortened series: all parts fail, naming the folders. Parts that share only positions (a
    reused SeriesInstanceUID, other instances) stay separate cases.
    """
    sops = [{k for k in keys if k.startswith("sop ")} for _, keys in pieces]
    every = set().union(*sops)
    shared = {k for i, a in enumerate(sops) for b in sops[i + 1 :] for k in a & b}
    if not shared or any(s == every for s in sops):
        return ""
    folders = ", ".join(
        f"{os.path.commonpath([str(f.parent) for f in files])} ({len(files)} files)" for files, _ in pieces
    )
    return (
        f"series {uid} is split over folders that overlap ({len(shared)} instance(s) in more than one) and "
        f"none holds all {len(every)} of its instances: {folders}; a part alone would be a shortened "
        "series, so none was denoised: gather the instances in one folder"
    )


#: ``Case.kind`` of a folder of the input tree that could not be listed (always a failed case).
UNLISTED = "unlisted"


def _unlisted_cases(errors: list[OSError], root: Path) -> list[Case]:
    """A failed case per folder that could not be listed: what it holds is unknown, so it is in the
    summary (exit status 1) and listed again by the next run, not skipped without a word."""
    cases = []
    for exc in errors:
        folder = Path(exc.filename or root)
        reason = exc.strerror or type(exc).__name__
        if os.path.abspath(folder) == os.path.abspath(root):
            raise UserError(f"INPUT {root}: cannot list it ({reason})")
        cases.append(
            Case(
                _relative_id(folder, root),
                UNLISTED,
                source=str(folder),
                error=f"cannot list {folder}: {reason}",
            )
        )
    return cases


def discover_tree(root: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> list[Case]:
    """The cases under ``root``: each DICOM image series (grouped by SeriesInstanceUID) and each
    NRRD/NIfTI/MHA file. Files that are neither are ignored; ``exclude`` (e.g. the output folder
    inside the input) is not searched. A folder that cannot be listed is a failed case of its own.

    Raises
    ------
    UserError
        ``root`` itself cannot be listed.
    """
    root = Path(root)
    unlisted: list[OSError] = []
    files = walk_files(root, exclude=Path(exclude) if exclude is not None else None, unlisted=unlisted)
    volumes = [f for f in files if image_suffix(f)]
    series = _group_by_folder(f for f in files if may_be_dicom(f))
    cases = [volume_case(_volume_id(f, root), f) for f in volumes]
    return _unique_ids(cases + _series_cases(series, root) + _unlisted_cases(unlisted, root))


def _manifest_rows(manifest: Path) -> list[dict[str, str]]:
    """The manifest's rows that name a case, as lower-cased column -> stripped cell.

    Raises
    ------
    UserError
        Unreadable file, no header, neither a ``path`` nor a ``series_uid`` column, no rows.
    """
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"manifest {manifest}: cannot read it as CSV ({exc})") from None
    if "path" not in columns and "series_uid" not in columns:
        raise UserError(
            f"manifest {manifest}: needs a header with a 'path' and/or 'series_uid' column; found {columns or 'none'}"
        )
    rows = [r for r in rows if r.get("path") or r.get("series_uid")]
    if not rows:
        raise UserError(f"manifest {manifest}: lists no cases")
    return rows


def _not_one_series_problem(found: list[Series], uid: str, path: Path) -> str:
    """Why a manifest row located zero or several series: copies of one UID, a missing UID, or no UID."""
    if len(found) > 1 and uid:
        folders = ", ".join(os.path.commonpath([str(f.parent) for f in files]) for _, files, _ in found)
        return f"series {uid} has copies of the same slices in {folders}; give one folder as path"
    if uid:
        return f"no DICOM series {uid} under {path}"
    return f"{path} holds {len(found)} DICOM image series; add a series_uid column"


def _refuse_repeated_rows(rows: list[dict[str, str]], manifest: Path, base: Path) -> None:
    """Refuse a manifest that names one study twice under one name (the same path, series_uid and
    case): its copies would share an output; a second ``case`` name is a deliberate second output.

    Raises
    ------
    UserError
        Two rows with the same path (resolved against the manifest's folder), series_uid and case.
    """
    first: dict[tuple[str, str, str], int] = {}
    for number, row in enumerate(rows, start=2):
        path_text = row.get("path", "")
        path = (
            os.path.normpath(path_text if os.path.isabs(path_text) else base / path_text) if path_text else ""
        )
        key = (path, row.get("series_uid", ""), row.get("case", ""))
        if key in first:
            what = ", ".join(f"{k} {v!r}" for k, v in zip(("path", "series_uid", "case"), key) if v)
            raise UserError(
                f"manifest {manifest}: lines {first[key]} and {number} name the same study ({what}); "
                "list each study once (or give each copy its own case name)"
            )
        first[key] = number


def read_manifest(
    manifest: str | os.PathLike, *, search_root: str | os.PathLike | None = None
) -> tuple[list[Case], Path]:
    """The cases a CSV manifest lists, and the root their ids are relative to.

    The CSV has a header with ``path`` and/or ``series_uid`` (and optionally ``case``, the output
    name). ``path`` is a volume file or a DICOM folder, relative to the manifest's folder; a row
    with only ``series_uid`` is looked up under ``search_root`` (default: the manifest's folder).
    A row that cannot be located becomes a case with ``error`` set, so it is reported, not fatal.

    Raises
    ------
    UserError
        Unreadable file, no header, neither a ``path`` nor a ``series_uid`` column, no rows.
    """
    manifest = Path(manifest)
    base = manifest.parent
    root = Path(search_root) if search_root is not None else base
    rows = _manifest_rows(manifest)
    _refuse_repeated_rows(rows, manifest, base)
    index: list[Series] | None = None  # the series under root, found once when needed
    index_unlisted: list[OSError] = []
    cases = []
    for number, row in enumerate(rows, start=2):
        path_text, uid, name = row.get("path", ""), row.get("series_uid", ""), row.get("case", "")
        where = f"manifest line {number}"
        name = _checked_name(name, f"manifest {manifest} line {number}") if name else ""
        unlisted: list[OSError] = []
        if path_text:
            path = Path(path_text) if Path(path_text).is_absolute() else base / path_text
            if not path.exists():
                cases.append(
                    Case(
                        name or _volume_id(path, base),
                        "missing",
                        source=str(path),
                        error=f"{where}: {path} not found",
                    )
                )
                continue
            if path.is_file() and image_suffix(path):
                case = volume_case(name or _volume_id(path, base), path)
                cases.append(replace(case, error=f"{where}: {case.error}") if case.error else case)
                continue
            found = _group_by_folder(walk_files(path, unlisted=unlisted) if path.is_dir() else [path])
            label = name or _relative_id(path, base)
        else:
            if index is None:
                index = _group_by_folder(
                    f for f in walk_files(root, unlisted=index_unlisted) if may_be_dicom(f)
                )
            found, label, path, unlisted = index, name, root, index_unlisted
        if uid:
            found = [s for s in found if s[0] == uid]
        if len(found) != 1 or (unlisted and path_text):
            if len(found) == 1:  # the series may have more slices in the folder that cannot be listed
                problem = f"{path} holds a folder that cannot be listed, so its series may be incomplete"
            else:
                problem = _not_one_series_problem(found, uid, path)
            if unlisted:
                problem += f" (cannot list {unlisted[0].filename}: {unlisted[0].strerror or unlisted[0]})"
            cases.append(
                Case(label or uid, "missing", series_uid=uid, source=str(path), error=f"{where}: {problem}")
            )
            continue
        case = _series_cases(found, base if path_text else root)[0]
        cases.append(replace(case, case_id=label or case.case_id))
    return _unique_ids(cases), base


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N) with 0 ≤ K < N (K as in SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX)."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UserError(f"--shard {text!r}: expected K/N, e.g. 0/4 (K counts from 0)") from None
    if n < 1 or not 0 <= k < n:
        raise UserError(f"--shard {text!r}: need N >= 1 and 0 <= K < N")
    return k, n


def shard_of(case_id: str, n: int) -> int:
    """The shard (0..n-1) of a case: a stable hash of its id, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(case_id.encode("utf-8")).digest()[:8], "big") % n


def shard_cases(cases: list[Case], k: int, n: int) -> list[Case]:
    """The cases of shard ``k`` of ``n``, sorted by id: shards 0..n-1 cover each case once.

    A case's shard depends on its id alone (:func:`shard_of`), not on its place in the list: a
    study added to or removed from the archive between the starts of two shards moves no other
    case to another shard (by position, cases were then done twice or not at all).
    """
    return [c for c in sorted(cases, key=lambda c: c.case_id) if shard_of(c.case_id, n) == k]


def refuse_outputs_over_inputs(cases: list[Case], out_root: str | os.PathLike, *, dicom: bool) -> list[Case]:
    """``cases``, each one whose output would replace another case's input (or, a DICOM folder,
    contain one) marked failed: no output of the run lands on any input of the run, not only on
    its own (a manifest may name files inside OUT, and an INPUT tree may lie inside OUT).

    Parameters
    ----------
    cases : list of Case
        Every case of the run (all shards: another shard's input counts too).
    out_root : path-like
        OUT.
    dicom : bool
        Outputs are DICOM folders (``--dicom``), else NRRD files.

    Returns
    -------
    list of Case
        The same cases in order; a colliding one with ``error`` set (reported, never run).
    """
    root = Path(out_root).resolve()
    owner: dict[Path, str] = {}  # every input file inside OUT -> its case
    for case in cases:
        for name in case.files:
            try:
                path = Path(name).resolve()
            except (RuntimeError, OSError):  # a loop of links: the reader reports it
                continue
            if path.is_relative_to(root):
                owner.setdefault(path, case.case_id)
    if not owner:
        return cases  # the usual run: no input inside OUT
    for path, case_id in list(owner.items()):  # and every folder inside OUT that holds one
        for folder in path.parents:
            if not folder.is_relative_to(root) or folder == root:
                break
            owner.setdefault(folder, case_id)
    checked = []
    for case in cases:
        try:
            out = output_path(root, case.case_id, dicom=dicom).resolve()
        except (UserError, RuntimeError, OSError):  # a refused id: the case's own load reports it
            checked.append(case)
            continue
        victim = owner.get(out)
        if victim is not None and not case.error:
            whose = "its own input" if victim == case.case_id else f"the input of case {victim}"
            case = replace(
                case,
                error=f"its output {out} would overwrite {whose}; choose an OUT that holds no input files",
            )
        checked.append(case)
    return checked
