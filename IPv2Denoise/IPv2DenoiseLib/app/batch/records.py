"""Done records, output verification and the batch summaries (CSV + JSON).

A case counts as done only through its record ``OUT/.ipv2-batch/records/<case_id>.json``, written
atomically *after* the output is atomically in place. The record holds the output's sha256 and
size, the input's fingerprint and the settings (model, its sha256, background removal, format).
A rerun skips a case only when its record matches all of these and the output on disk still has
that hash, so a process killed at any moment leaves either a verified case or one that is redone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.paths import path_inside

#: Hidden folder inside OUT holding the batch's own state.
STATE_DIR = ".ipv2-batch"
#: Summary file stem inside OUT (``.csv`` and ``.json``); shards add ``.shard-K-of-N``.
SUMMARY_STEM = "batch-summary"
#: Columns of the summary CSV, in order (the JSON rows have the same keys).
SUMMARY_COLUMNS = (
    "case",
    "status",
    "input",
    "output",
    "series_uid",
    "shape",
    "seconds",
    "device",
    "worker",
    "attempts",
    "noise_before_hu",
    "noise_after_hu",
    "output_sha256",
    "warnings",
    "error",
)
#: Row statuses: finished in this run, verified as finished by an earlier run, failed.
STATUSES = ("done", "skipped", "failed")


def output_path(out_root: Path, case_id: str, *, dicom: bool) -> Path:
    """Where a case's output goes: ``OUT/<case_id>.nrrd``, or the folder ``OUT/<case_id>/`` of a DICOM series.

    Checked to lie inside OUT (symlinks resolved) and outside the batch's state folder, so no case
    id can make the batch write or remove anything else (:class:`UserError` otherwise).
    """
    out = out_root / case_id if dicom else out_root / f"{case_id}.nrrd"
    if path_inside(out_root, out).is_relative_to(Path(out_root, STATE_DIR).resolve()):
        raise UserError(f"case {case_id!r} would write into the batch's state folder {STATE_DIR}; refused")
    return out


def record_path(out_root: Path, case_id: str) -> Path:
    """``OUT/.ipv2-batch/records/<case_id>.json``, checked to lie inside that folder."""
    records = Path(out_root) / STATE_DIR / "records"
    path = records / f"{case_id}.json"
    path_inside(records, path)
    return path


def hash_output(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of an output file, or of a folder's files (sha256 over sorted name + file hash)."""
    if path.is_dir():
        digest, total = hashlib.sha256(), 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            file_hash, size = hash_output(f)
            digest.update(f"{f.relative_to(path).as_posix()}\0{file_hash}\n".encode())
            total += size
        return digest.hexdigest(), total
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), path.stat().st_size


def write_record(out_root: Path, case_id: str, record: dict[str, Any]) -> Path:
    """Write a done record atomically (call only once the output is in place)."""
    path = record_path(out_root, case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    return path


def read_record(out_root: Path, case_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(out_root, case_id).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def verified_record(
    out_root: Path, case_id: str, *, fingerprint: str, settings: dict[str, Any], dicom: bool
) -> dict[str, Any] | None:
    """The case's done record if it matches the input, the settings and the output on disk; else None."""
    record = read_record(out_root, case_id)
    if not record or record.get("input_fingerprint") != fingerprint or record.get("settings") != settings:
        return None
    out = output_path(out_root, case_id, dicom=dicom)
    if not out.exists():
        return None
    try:
        sha256, size = hash_output(out)
    except OSError:
        return None
    if sha256 != record.get("output_sha256") or size != record.get("output_bytes"):
        return None
    return record


def forget_record(out_root: Path, case_id: str) -> None:
    """Remove a stale record before its case is redone (so a kill mid-redo never leaves it standing)."""
    record_path(out_root, case_id).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- summaries


def summary_stem(shard: tuple[int, int] | None) -> str:
    return SUMMARY_STEM if shard is None else f"{SUMMARY_STEM}.shard-{shard[0]}-of-{shard[1]}"


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    counts["cases"] = sum(counts[s] for s in STATUSES)
    return counts


def write_summary(out_root: Path, rows: list[dict[str, Any]], info: dict[str, Any], *, stem: str) -> Path:
    """Write ``<stem>.csv`` and ``<stem>.json`` (rows sorted by case) atomically; returns the CSV path."""
    rows = sorted(rows, key=lambda r: r["case"])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in SUMMARY_COLUMNS})
    csv_path = out_root / f"{stem}.csv"
    with atomic_path(csv_path, suffix=".csv") as tmp:
        Path(tmp).write_text(text.getvalue(), encoding="utf-8")
    document = {**info, "totals": totals(rows), "cases": rows}
    with atomic_path(out_root / f"{stem}.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(document, indent=1), encoding="utf-8")
    return csv_path


def run_identity(case_ids: Iterable[str], settings: dict[str, Any]) -> dict[str, Any]:
    """What makes shards parts of one run: the settings and the case list every shard found.

    Written into each summary (``identity`` and its hash ``run_identity``); ``batch-summary``
    combines only shards whose hashes agree, so shards started on different inputs, models or
    formats, or on an archive that changed between their starts, are refused instead of merged.

    Parameters
    ----------
    case_ids : iterable of str
        The ids of every case of the run (all shards).
    settings : dict
        Input, model and output settings (JSON values), e.g. ``{"input": ..., "model": ...}``.

    Returns
    -------
    dict
        ``settings`` plus ``cases_found`` and ``case_ids_sha256`` (sha256 of the sorted ids), and
        ``run_identity``: the sha256 of all of it.
    """
    ids = sorted(case_ids)
    identity = {
        **settings,
        "cases_found": len(ids),
        "case_ids_sha256": hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
    return {**identity, "run_identity": digest}


_SHARD_FILE = re.compile(rf"^{re.escape(SUMMARY_STEM)}\.shard-(\d+)-of-(\d+)\.json$")
#: Keys of a shard summary that describe the shard itself, not the combined run.
_SHARD_KEYS = ("cases", "totals", "shard", "shard_cases", "pending", "stopped")


def _some(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more, for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_not_interrupted(document: dict[str, Any], where: str) -> None:
    """Refuse the summary of a shard that was interrupted or stopped, naming its cases without a row."""
    if not (document.get("interrupted") or document.get("stopped")):
        return
    rows, pending = document.get("cases") or [], document.get("pending")
    why = f"stopped: {document['stopped']}" if document.get("stopped") else "interrupted"
    if pending:
        missing = f"{len(pending)} of its cases have no row ({_some(pending)})"
    else:
        missing = f"only {len(rows)} of its cases have a row (its summary does not list the others)"
    raise UserError(
        f"{where} has not finished ({why}): {missing}; rerun that shard (its finished cases are skipped)"
    )


def _check_complete(document: dict[str, Any], where: str) -> None:
    """Refuse a shard summary without a run identity (an older version's) or without a row per case."""
    rows, pending = document.get("cases") or [], document.get("pending")
    if "identity" not in document or "run_identity" not in document or pending is None:
        raise UserError(
            f"{where}: its summary has no run identity (written by an older ipv2-denoise); rerun that "
            "shard (its finished cases are skipped)"
        )
    if pending or len(rows) != document.get("shard_cases"):
        raise UserError(
            f"{where} has rows for {len(rows)} of its {document.get('shard_cases')} cases"
            + (f"; no row for {_some(pending)}" if pending else "")
            + "; rerun that shard (its finished cases are skipped)"
        )


def _check_one_run(found: dict[int, dict[str, Any]], n: int) -> None:
    """Refuse shards whose run identities differ, naming the first difference."""
    first = found[0]["identity"]
    for k in range(1, n):
        if found[k]["run_identity"] == found[0]["run_identity"]:
            continue
        other = found[k]["identity"]
        pair = f"shard {k}/{n} and shard 0/{n} are not from one run"
        settings = (set(first) | set(other)) - {"cases_found", "case_ids_sha256"}
        if other.get("case_ids_sha256") != first.get("case_ids_sha256") and all(
            other.get(key) == first.get(key) for key in settings
        ):
            raise UserError(
                f"{pair}: they found different cases ({other.get('cases_found')} and {first.get('cases_found')}; "
                "the input changed between their starts); rerun every shard with the same command "
                "(finished cases are skipped)"
            )
        key = next((key for key in sorted(settings) if first.get(key) != other.get(key)), "run_identity")
        raise UserError(
            f"{pair}: {key} {other.get(key)!r} differs from {first.get(key)!r}; run every shard with the "
            "same INPUT and options"
        )


def _rows_of_every_case(found: dict[int, dict[str, Any]], n: int, out_root: Path) -> list[dict[str, Any]]:
    """The shards' rows, refused unless each case of the run has exactly one."""
    rows: dict[str, dict[str, Any]] = {}
    for k in range(n):
        for row in found[k]["cases"]:
            if row["case"] in rows:
                raise UserError(
                    f"case {row['case']!r} appears in two shards; the shards are not from one run"
                )
            rows[row["case"]] = row
    expected = found[0]["identity"].get("cases_found")
    if len(rows) != expected:
        raise UserError(
            f"{out_root}: the {n} shards have rows for {len(rows)} of the {expected} cases of their run; "
            "rerun every shard with the same command (finished cases are skipped)"
        )
    return list(rows.values())


def combine_shard_summaries(out_root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Merge the shard summaries in ``out_root`` into one list of rows.

    Only the finished shards of one run are combined: each summary must say it was not
    interrupted, have a row for every case of its shard, and carry the same run identity
    (:func:`run_identity`: input, model, options and case list) as the others.

    Parameters
    ----------
    out_root : pathlib.Path
        The OUT folder the shards wrote their ``batch-summary.shard-K-of-N.json`` into.

    Returns
    -------
    rows : list of dict
        One row per case of the run.
    info : dict
        The run's metadata (from shard 0; ``combined_shards``, ``seconds`` of the slowest shard).

    Raises
    ------
    UserError
        No shard summaries, shards of different N, a missing or unfinished shard (named with its
        cases without a row), shards of different runs, or a case in two shards.
    """
    found: dict[int, dict[str, Any]] = {}
    counts = set()
    for path in sorted(Path(out_root).glob(f"{SUMMARY_STEM}.shard-*-of-*.json")):
        match = _SHARD_FILE.match(path.name)
        if not match:
            continue
        k, n = int(match.group(1)), int(match.group(2))
        try:
            found[k] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable shard summary ({exc})") from None
        counts.add(n)
    if not found:
        raise UserError(f"{out_root}: no shard summaries ({SUMMARY_STEM}.shard-K-of-N.json) to combine")
    if len(counts) != 1:
        raise UserError(
            f"{out_root}: shard summaries of different shard counts {sorted(counts)}; keep one run's"
        )
    (n,) = counts
    missing = sorted(set(range(n)) - set(found))
    if missing:
        raise UserError(
            f"{out_root}: shards {', '.join(map(str, missing))} of {n} have no summary yet; run them first"
        )
    for check in (_check_not_interrupted, _check_complete):
        for k in range(n):
            check(found[k], f"shard {k}/{n}")
    _check_one_run(found, n)
    rows = _rows_of_every_case(found, n, out_root)
    info = {key: value for key, value in found[0].items() if key not in _SHARD_KEYS}
    info["combined_shards"] = n
    info["seconds"] = round(max(float(found[k].get("seconds", 0.0)) for k in range(n)), 3)
    return rows, info


__all__ = [
    "STATE_DIR",
    "SUMMARY_COLUMNS",
    "combine_shard_summaries",
    "forget_record",
    "hash_output",
    "output_path",
    "read_record",
    "record_path",
    "run_identity",
    "summary_stem",
    "totals",
    "verified_record",
    "write_record",
    "write_summary",
]
