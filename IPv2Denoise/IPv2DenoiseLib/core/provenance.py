"""Which network made the pixels: the provenance every derived output carries.

One home for the sentence a derived DICOM series (DerivationDescription, ContributingEquipment)
and the command line's log give about the model; :mod:`IPv2DenoiseLib.denoiser.model_reference`
makes it for a model, :mod:`IPv2DenoiseLib.io.dicom_export` writes it. Plain data: no torch, no
pydicom.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from IPv2DenoiseLib import __version__

#: The software named as the modifying equipment and in every provenance sentence.
SOFTWARE_NAME = "ipv2-denoise"


@dataclass(frozen=True)
class ModelProvenance:
    """Which network made the pixels: written into DerivationDescription (and the CLI's log)."""

    name: str = "unknown"
    version: str = "unversioned"
    sha256: str | None = None
    strategy: str = "ipv2"
    #: Scan-adaptive fine-tuning on this very scan (``denoise --adapt``): "N steps in S s", else None.
    adapted: str | None = None
    #: The output refined by collaborative Wiener filtering with the network as pilot (``--refine``).
    refined: bool = False
    #: The denoising strength (``--strength``): the factor on the network's noise level map; 1 as validated.
    strength: float = 1.0
    #: The test-time ensemble size (``--ensemble``): the mean over this many flipped and rotated passes; 1: one pass.
    ensemble: int = 1

    @classmethod
    def from_card(
        cls,
        name: str,
        card: Mapping[str, Any] | None,
        *,
        default_version: str = "unversioned",
        refined: bool = False,
        strength: float = 1.0,
        ensemble: int = 1,
    ) -> ModelProvenance:
        """From a model card (:mod:`IPv2DenoiseLib.denoiser.weights`): ``version``, ``sha256``, ``strategy``,
        and ``adapted`` (the record of ``training.adapt`` when the model was fine-tuned on the scan);
        ``refined``, ``strength`` and ``ensemble`` as the run had them."""
        card = card or {}
        adapted = card.get("adapted")
        return cls(
            name=str(name),
            version=str(card.get("version") or default_version),
            sha256=card.get("sha256"),
            strategy=str(card.get("strategy") or "ipv2"),
            adapted=f"{adapted['iterations']} steps in {adapted['seconds']:.0f} s" if adapted else None,
            refined=bool(refined),
            strength=float(strength),
            ensemble=int(ensemble),
        )

    def to_record(self) -> dict[str, Any]:
        """Plain JSON-able fields, read back by :meth:`from_record` (the denoise command's JSON
        progress carries them; the Slicer module keeps them on the denoised node, so a scene saved
        today still names the weights that made it after an upgrade changes the shipped ones)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelProvenance:
        """From :meth:`to_record`'s fields (a scene file is input like any other: unknown keys are
        dropped and each value is checked for its type).

        Raises
        ------
        ValueError
            A field of the wrong type, an ensemble below 1, a strength that is not a positive
            number, or no model name.
        """
        values: dict[str, Any] = {}
        for spec in fields(cls):
            value = record.get(spec.name)
            if value is None:
                continue
            wanted = {"refined": bool, "strength": float, "ensemble": int}.get(spec.name, str)
            if wanted is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # a whole strength, as JSON may write it
            if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
                raise ValueError(f"provenance field {spec.name!r} is not a {wanted.__name__}")
            if spec.name == "ensemble" and value < 1:
                raise ValueError(f"provenance field 'ensemble' must be at least 1, got {value}")
            if spec.name == "strength" and not (math.isfinite(value) and value > 0):
                raise ValueError(f"provenance field 'strength' must be a positive number, got {value}")
            values[spec.name] = value
        if not values.get("name"):
            raise ValueError("provenance without a model name")
        return cls(**values)

    def describe(self) -> str:
        """One sentence for DerivationDescription (at most 1024 characters)."""
        weights = f", weights sha256 {self.sha256}" if self.sha256 else ""
        adapted = (
            f", then fine-tuned on this scan alone ({self.adapted}, recorrupted pairs)"
            if self.adapted
            else ""
        )
        refined = (
            ", refined by collaborative Wiener filtering with the network as pilot" if self.refined else ""
        )
        strength = (
            f", denoising strength {self.strength:g} (the noise level map scaled by it; 1 as validated)"
            if self.strength != 1.0
            else ""
        )
        ensemble = (
            f", averaged over {self.ensemble} flipped and rotated passes (test-time ensemble)"
            if self.ensemble > 1
            else ""
        )
        return (
            f"Denoised by {SOFTWARE_NAME} {__version__}: model {self.name} version {self.version}{weights}, "
            f"training strategy {self.strategy}{adapted}{refined}{strength}{ensemble} (see the model card; "
            "IPv2 image purification: Gong & Yu, arXiv 2602.19314)"
        )


__all__ = ["SOFTWARE_NAME", "ModelProvenance"]
