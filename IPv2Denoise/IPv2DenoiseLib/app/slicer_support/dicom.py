"""DICOM in the scene: the source files of a node, and the derived series export (with provenance).

A denoised node carries how it was made in the attribute :data:`PROVENANCE_ATTRIBUTE` (set by
:class:`~IPv2DenoiseLib.app.slicer_support.job.DenoiseJob`): the model, a weights file, the record
of a fine-tuning on the scan (*Adapt*), the refinement, the strength, the ensemble and the warnings.
The export writes exactly that into the derived series, as ``ipv2-denoise denoise --dicom`` does,
whatever happened in the scene since.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from IPv2DenoiseLib.app.pipeline import DenoiseOptions
from IPv2DenoiseLib.app.slicer_support.scene import node_geometry, volume_from_node
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.provenance import ModelProvenance
from IPv2DenoiseLib.denoiser.ensemble import check_ensemble
from IPv2DenoiseLib.denoiser.model_reference import ModelReference
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, check_strength

#: Node attribute holding the JSON record of how the node was denoised.
PROVENANCE_ATTRIBUTE = "IPv2Denoise.Provenance"


def store_provenance(
    node,
    options: DenoiseOptions,
    *,
    adapted: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
    input_node=None,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Record on a denoised node which model made it and how (read back by :func:`node_provenance`),
    and from which input node (read back by :func:`made_from_another_input`).

    ``provenance`` is what the run reported about its weights (name, version, sha256:
    :meth:`~IPv2DenoiseLib.core.provenance.ModelProvenance.to_record`). It is kept as it was, so a
    scene saved with the node and exported after an upgrade names the weights that made the pixels,
    not the catalogue's entry of that name at export time.
    """
    record = {
        "input": input_node.GetID() if input_node is not None else None,
        "model": options.model,
        "weights": options.weights,
        "adapted": dict(adapted) if adapted else None,
        "refined": bool(options.refine),
        "strength": options.strength,
        "ensemble": options.ensemble,
        "warnings": list(warnings or []),
        "provenance": dict(provenance) if provenance else None,
    }
    node.SetAttribute(PROVENANCE_ATTRIBUTE, json.dumps(record))


def made_from_another_input(output_node, input_node) -> bool:
    """Whether ``output_node`` holds the result of denoising a different input node.

    The panel keeps the last run's output selected; a run on another scan must not overwrite it
    (its name, study and record are the other scan's), so such a node is not reused as a target.
    """
    try:
        record = json.loads(output_node.GetAttribute(PROVENANCE_ATTRIBUTE) or "{}")
    except ValueError:
        return False
    made_from = record.get("input") if isinstance(record, dict) else None
    return bool(made_from) and made_from != input_node.GetID()


def check_denoised_from(denoised_node, original_node) -> None:
    """Refuse a (original, denoised) pair whose denoised node records another input.

    The panel keeps the last output selected when the user picks another input: Export would then
    write scan A's pixels under patient B's identity, and the ROI table and the comparison would
    set two scans side by side as before and after.

    Parameters
    ----------
    denoised_node : vtkMRMLScalarVolumeNode
        The output the panel or a script pairs with ``original_node``.
    original_node : vtkMRMLScalarVolumeNode
        The input it is meant to be the denoised version of.

    Raises
    ------
    UserError
        ``denoised_node`` was denoised from another node.
    """
    if made_from_another_input(denoised_node, original_node):
        raise UserError(
            f"{denoised_node.GetName()!r} was denoised from another volume, not from {original_node.GetName()!r}: "
            f"run Apply on {original_node.GetName()!r} first, or select its own output"
        )


def node_provenance(node, *, model_name: str = "") -> tuple[ModelProvenance, list[str]]:
    """(provenance, warnings) of a denoised node: from its record, else from ``model_name`` (a node
    denoised by a script, or loaded from a file: the catalogue's model, nothing more is known)."""
    try:
        record = json.loads(node.GetAttribute(PROVENANCE_ATTRIBUTE) or "{}")
    except ValueError:
        record = {}
    warnings = [str(w) for w in record.get("warnings") or []]
    if isinstance(record.get("provenance"), Mapping):  # what the run said about its weights
        try:
            return ModelProvenance.from_record(record["provenance"]), warnings
        except ValueError:
            pass  # a damaged record: fall back to the catalogue's entry of that name, as below
    model = record.get("model") or model_name or "default"
    try:
        reference = ModelReference.resolve(model, record.get("weights"))
    except Exception:  # noqa: BLE001 - a weights file moved since: still name the model
        return ModelProvenance(name=str(model)), warnings
    try:  # a record from before --strength, or a damaged one: the strength every model was validated at
        strength = check_strength(record.get("strength", DEFAULT_STRENGTH))
    except UserError:
        strength = DEFAULT_STRENGTH
    try:  # likewise a record from before the ensemble was kept: one pass
        ensemble = check_ensemble(record.get("ensemble", 1))
    except UserError:
        ensemble = 1
    provenance = reference.provenance(
        adapted=record.get("adapted"),
        refined=bool(record.get("refined")),
        strength=strength,
        ensemble=ensemble,
    )
    return provenance, warnings


def dicom_source_files(node, *, database=None) -> list[str] | None:
    """The source DICOM files of a node loaded from DICOM, in the node's k (z) order; None if it was not.

    Uses the node's ``DICOM.instanceUIDs`` attribute and the DICOM database
    (``slicer.dicomDatabase`` inside Slicer), then sorts the files by their position along the
    volume's slice axis so file ``k`` is slice ``k``.
    """
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    database = database if database is not None else getattr(slicer, "dicomDatabase", None)
    files = [database.fileForInstance(uid) for uid in uids] if database is not None else []
    lost = len(uids) - sum(1 for f in files if f and os.path.exists(f))
    if lost:
        # a new patient and study would be invented, and land on the PACS as an orphan
        raise UserError(
            f"volume {node.GetName()!r} was loaded from DICOM, but {lost} of its {len(uids)} source files are "
            "no longer in the DICOM database (moved or deleted): import the study again, then export"
        )
    import pydicom  # lazy: Slicer loads this module before ensure_in_slicer installs pydicom

    _, origin, direction = node_geometry(node)
    normal = np.asarray(direction).reshape(3, 3)[:, 2]
    keyed = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
        ipp = np.asarray(getattr(ds, "ImagePositionPatient", origin), dtype=float)
        keyed.append((float((ipp - np.asarray(origin)) @ normal), f))
    return [f for _, f in sorted(keyed)]


def unused_folder(folder: str | os.PathLike) -> Path:
    """``folder``, or ``folder_2``, ``folder_3``…: the first that does not exist yet.

    The panel names the export folder after the volume; a second export of it (after another
    run, say) goes beside the first instead of being refused, and never replaces it.
    """
    folder = Path(folder)
    candidate, number = folder, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = folder.with_name(f"{folder.name}_{number}")
    return candidate


def export_dicom(
    denoised_node,
    out_dir: str | os.PathLike,
    *,
    source_node=None,
    model_name: str = "",
    send_to: str | None = None,
    calling_aet: str | None = None,
    timeout: float = 10.0,
    database=None,
):
    """Write the denoised node as a derived DICOM series, optionally store it on a PACS.

    The same writer as ``ipv2-denoise denoise --dicom`` (:func:`~IPv2DenoiseLib.io.dicom_export.
    export_derived_series`): in the source node's study when it was loaded from DICOM (its files
    come from the DICOM database), otherwise a new CT series. ``send_to`` is ``HOST:PORT:AET`` or a
    DICOMweb URL (the module's *PACS* setting); the files stay in ``out_dir`` whatever the PACS says.

    Returns
    -------
    (list of Path, SendReport or None)

    Raises
    ------
    UserError
        Export problems; PACS unreachable, association rejected, or instances refused (named).
    """
    # lazy: Slicer loads this module before ensure_in_slicer installs pydicom and pynetdicom
    from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions, export_derived_series, slices_are_sources
    from IPv2DenoiseLib.io.dicom_net import DEFAULT_CALLING_AET, parse_destination, send

    target = parse_destination(send_to) if send_to else None  # a bad setting fails before writing
    if source_node is not None:  # never scan A's pixels under patient B's identity
        check_denoised_from(denoised_node, source_node)
    sources = dicom_source_files(source_node, database=database) if source_node is not None else None
    provenance, warnings = node_provenance(denoised_node, model_name=model_name)
    options = DerivedSeriesOptions(model=provenance, warnings=tuple(warnings))
    volume = volume_from_node(denoised_node)
    series = None
    if sources is not None and not slices_are_sources(volume, sources):
        # Slicer regularised the series (a tilted stack, a gap): still its patient and study
        sources, series = None, sources
    files = export_derived_series(volume, out_dir, source_files=sources, series_files=series, options=options)
    report = None
    if target is not None:
        try:
            report = send(files, target, calling_aet=calling_aet or DEFAULT_CALLING_AET, timeout=timeout)
            report.raise_for_failures()
        except UserError as exc:  # the series is written: say so, and how to send it again
            raise UserError(
                f"wrote {len(files)} DICOM files to {out_dir}, but sending them failed: {exc}; "
                f"they stay there: send that folder with `ipv2-denoise send {out_dir} --to {send_to}`"
            ) from None
    return files, report


__all__ = [
    "PROVENANCE_ATTRIBUTE",
    "check_denoised_from",
    "dicom_source_files",
    "export_dicom",
    "made_from_another_input",
    "node_provenance",
    "store_provenance",
    "unused_folder",
]
