"""Which model, from where: the shipped-model catalogue (``models.json``) and a reference to one model.

The one door to "which model runs": the command line (``--model`` / ``--weights``), ``batch``,
``serve``, the Slicer module, the web app and the benchmarks all turn their choice into a
:class:`ModelReference`, which reads the catalogue once, finds the weights and their model card,
loads a :class:`~IPv2DenoiseLib.denoiser.infer.Denoiser` and states its provenance (adaptation
included). Torch-free until :meth:`ModelReference.load`, so the Slicer module and ``--help`` can
list models and describe provenance before torch is installed.

Two words, two things: the **catalogue** is ``Resources/Models/models.json`` (trained models we
ship, by name); the **architecture registry** (:mod:`IPv2DenoiseLib.denoiser.models.registry`) maps
an architecture name in a model card to its network class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPv2DenoiseLib import __version__
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.provenance import ModelProvenance
from IPv2DenoiseLib.core.resources import models_dir
from IPv2DenoiseLib.denoiser.ensemble import check_ensemble
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, check_strength

if TYPE_CHECKING:
    from IPv2DenoiseLib.denoiser.infer import Denoiser

#: The name that stands for the catalogue's default model.
DEFAULT_MODEL = "default"
#: Model tiers a catalogue entry may carry (``"tier"``) and ``--model`` accepts as names: ``fast``
#: (>= 1 Mvoxel/s on 2 CPU cores; without a ``fast`` entry, the default model) and ``quality``
#: (larger, for GPUs and for CPU users who can wait; docs/models.md).
TIERS = ("fast", "quality")
#: What to do when no model of a tier is installed.
TRAIN_A_TIER = (
    "train one with `ipv2-denoise train --arch {tier} ...` or run scripts/gpu_train_job.py on a GPU"
)


def card_path(weights_path: str | os.PathLike) -> Path:
    """The model card next to a weights file: ``x.safetensors`` → ``x.json``.

    Parameters
    ----------
    weights_path : path-like
        The weights file (need not exist).

    Returns
    -------
    pathlib.Path
        The card's path.
    """
    return Path(weights_path).with_suffix(".json")


def read_card(weights_path: str | os.PathLike) -> dict[str, Any] | None:
    """The model card of a weights file as a dict, or None when there is none.

    Parameters
    ----------
    weights_path : path-like
        The weights file whose ``.json`` card is read.

    Returns
    -------
    dict or None
        The parsed card, or None when no card file exists.

    Raises
    ------
    UserError
        The card is not valid JSON or not a JSON object.
    """
    path = card_path(weights_path)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model card {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise UserError(f"model card {str(path)!r} must hold a JSON object, got {type(card).__name__}")
    return card


@dataclass(frozen=True)
class CatalogueEntry:
    """One shipped model: its name, weights file, checksum and one-line summary.

    Attributes
    ----------
    name : str
        The catalogue name (``--model NAME``).
    weights : pathlib.Path
        The resolved ``.safetensors`` file, inside the catalogue's folder.
    sha256 : str or None
        The checksum the catalogue lists, checked on load.
    summary : str
        One line for model lists.
    tier : str or None
        One of :data:`TIERS`, when the catalogue says.
    """

    name: str
    weights: Path
    sha256: str | None = None
    summary: str = ""
    tier: str | None = None

    @property
    def description(self) -> str:
        """The line a model list shows beside the name (Slicer tooltip, web hint): tier, then summary."""
        return f"{self.tier} tier: {self.summary}" if self.tier else self.summary


@dataclass(frozen=True)
class ModelCatalogue:
    """The shipped models (``models.json``: ``{"default": NAME, "models": {NAME: {"file", "sha256",
    "summary"}}}``, files relative to the JSON file's folder).

    Attributes
    ----------
    path : pathlib.Path
        The ``models.json`` file.
    default : str or None
        The name ``"default"`` stands for.
    entries : Mapping of str to CatalogueEntry
        The models by name.
    """

    path: Path
    default: str | None
    entries: Mapping[str, CatalogueEntry] = field(default_factory=dict)

    @classmethod
    def read(cls, models_json: str | os.PathLike | None = None) -> ModelCatalogue:
        """Read a catalogue (default: the bundled one, read once per process).

        Parameters
        ----------
        models_json : path-like, optional
            Another catalogue file; the bundled ``Resources/Models/models.json`` when omitted.

        Returns
        -------
        ModelCatalogue
            The parsed catalogue (cached until the file changes).

        Raises
        ------
        UserError
            Missing or invalid file.
        """
        path = Path(models_json) if models_json is not None else models_dir() / "models.json"
        return _read_catalogue(str(path.resolve()), _mtime(path))

    def entry(self, name: str = DEFAULT_MODEL) -> CatalogueEntry:
        """The entry for ``name``: a model name, ``"default"``, or a tier of :data:`TIERS`.

        Parameters
        ----------
        name : str
            A catalogue name, ``"default"``, or a tier (``"fast"``, ``"quality"``) unless a model
            carries that name itself.

        Returns
        -------
        CatalogueEntry
            The model.

        Raises
        ------
        UserError
            Unknown name (the message lists the known ones), or no model of the tier installed.
        """
        if name in TIERS and name not in self.entries:
            return self.tier_entry(name)
        key = self.default if name == DEFAULT_MODEL else name
        if key not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none yet (train one, or pass --weights FILE)"
            raise UserError(f"unknown model {name!r} in {self.path.name}; known models: {known}")
        return self.entries[key]

    def installed(self, name: str | None) -> tuple[str | None, str | None]:
        """The catalogue name to select for ``name`` kept from an earlier session (a saved scene's
        parameter, a front end's setting), and one line when it had to change.

        A model an upgrade renamed or removed is replaced by the default model, and the line says
        so: a front end would otherwise show one model while running another.

        Parameters
        ----------
        name : str or None
            The kept name: a model name, ``"default"`` or a tier; empty or None for the default.

        Returns
        -------
        tuple of (str or None, str or None)
            The name to select (None when the catalogue is empty), and the line to show or None.
        """
        names = self.names()
        if not names:
            return None, None
        try:
            return self.entry(name or DEFAULT_MODEL).name, None
        except UserError:
            chosen = self.entries[self.default].name if self.default in self.entries else names[0]
            return (
                chosen,
                f"model {name!r} is not installed (models: {', '.join(names)}); {chosen!r} is selected",
            )

    def names(self) -> list[str]:
        """The shipped model names: the default first, then the other tiers' models, then the rest."""
        return sorted(self.entries, key=lambda n: (n != self.default, self.entries[n].tier is None, n))

    def tier_entry(self, tier: str) -> CatalogueEntry:
        """The model of a tier: the default if it carries the tier, else the first by name; for
        ``fast``, the default model when no entry carries a tier.

        Raises
        ------
        UserError
            No model of that tier is installed (one line saying how to make one).
        """
        if tier not in TIERS:
            raise UserError(f"unknown model tier {tier!r}; tiers: {', '.join(TIERS)}")
        found = sorted(
            (e for e in self.entries.values() if e.tier == tier),
            key=lambda e: (e.name != self.default, e.name),
        )
        if found:
            return found[0]
        if tier == "fast" and self.default in self.entries and self.entries[self.default].tier is None:
            return self.entries[self.default]
        raise UserError(f"no {tier}-tier model is installed yet; {TRAIN_A_TIER.format(tier=tier)}")


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@lru_cache(maxsize=8)
def _read_catalogue(path_text: str, mtime_ns: int) -> ModelCatalogue:
    """Parse once per file version (the mtime is part of the cache key)."""
    path = Path(path_text)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"model registry {str(path)!r} does not exist; pass --weights FILE") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model registry {str(path)!r} is not valid JSON: {exc}") from None
    models = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models, dict):
        raise UserError(f"model registry {str(path)!r} has no 'models' object")
    entries = {}
    for name, item in models.items():
        if not isinstance(item, dict) or not isinstance(item.get("file"), str):
            raise UserError(f"model registry {str(path)!r}: entry {name!r} names no weights 'file'")
        weights = (path.parent / item["file"]).resolve()
        if not weights.is_relative_to(path.parent.resolve()):
            raise UserError(f"model registry {str(path)!r}: entry {name!r} points outside its folder")
        tier = item.get("tier")
        if tier is not None and tier not in TIERS:
            raise UserError(
                f"model registry {str(path)!r}: entry {name!r} has tier {tier!r}; tiers: {', '.join(TIERS)}"
            )
        entries[str(name)] = CatalogueEntry(
            str(name), weights, item.get("sha256"), str(item.get("summary", "")), tier
        )
    return ModelCatalogue(path, raw.get("default"), entries)


@dataclass(frozen=True)
class ModelReference:
    """One model to run: a catalogue entry (``registered``) or a weights file the user gave.

    Shipped models are versioned with the package; a user's file is "unversioned" unless its
    card says otherwise.

    Attributes
    ----------
    name : str
        The catalogue name, or the weights file's name.
    weights : pathlib.Path
        The ``.safetensors`` file.
    sha256 : str or None
        The checksum to verify on load (catalogue entries only).
    registered : bool
        Whether it comes from the shipped catalogue.
    """

    name: str
    weights: Path
    sha256: str | None = None
    registered: bool = False

    @classmethod
    def resolve(
        cls,
        model: str | None = DEFAULT_MODEL,
        weights: str | os.PathLike | None = None,
        *,
        models_json: str | os.PathLike | None = None,
    ) -> ModelReference:
        """``--weights FILE`` when given, else ``--model NAME`` from the catalogue.

        Parameters
        ----------
        model : str or None
            A catalogue name (``"default"`` or None for the default model); ignored with ``weights``.
        weights : path-like, optional
            A weights file the user gave; it wins over ``model``.
        models_json : path-like, optional
            Another catalogue file; the bundled one when omitted.

        Returns
        -------
        ModelReference
            The model to load; nothing is loaded yet (torch-free).

        Raises
        ------
        UserError
            Unknown model name, missing catalogue, or a weights file that does not exist.
        """
        if weights:
            path = Path(weights)
            if not path.is_file():
                raise UserError(f"weights file {str(path)!r} does not exist")
            return cls(path.name, path)
        entry = ModelCatalogue.read(models_json).entry(model or DEFAULT_MODEL)
        return cls(entry.name, entry.weights, entry.sha256, registered=True)

    def card(self) -> dict[str, Any]:
        """The model card (empty when there is none); torch-free."""
        return read_card(self.weights) or {}

    def load(self, *, ensemble: int = 1, refine: bool = False) -> Denoiser:
        """The network, ready to denoise (checksum verified); ``ensemble`` and ``refine`` as
        ``--ensemble`` and ``--refine``."""
        # lazy: torch; listing models and describing provenance must work without it (Slicer, --help)
        from IPv2DenoiseLib.denoiser.infer import Denoiser

        denoiser = Denoiser.from_file(self.weights, expected_sha256=self.sha256)
        denoiser.name = self.name
        denoiser.ensemble = ensemble
        denoiser.refine = refine
        return denoiser

    def provenance(
        self,
        card: Mapping[str, Any] | None = None,
        *,
        adapted: Mapping[str, Any] | None = None,
        refined: bool = False,
        strength: float = DEFAULT_STRENGTH,
        ensemble: int = 1,
    ) -> ModelProvenance:
        """What a derived output says about its model; ``card`` is the loaded model's (else read
        from disk), ``adapted`` the record of a scan-adaptive fine-tuning (``iterations``, ``seconds``),
        ``refined`` whether ``--refine`` ran, ``strength`` the denoising strength (``--strength``),
        ``ensemble`` the test-time ensemble size (``--ensemble``)."""
        card = dict(self.card() if card is None else card)
        if self.sha256 and not card.get("sha256"):
            card["sha256"] = self.sha256
        if adapted:
            card["adapted"] = dict(adapted)
        return ModelProvenance.from_card(
            self.name,
            card,
            default_version=__version__ if self.registered else "unversioned",
            refined=refined,
            strength=check_strength(strength),
            ensemble=check_ensemble(ensemble),
        )


__all__ = [
    "DEFAULT_MODEL",
    "TIERS",
    "CatalogueEntry",
    "ModelCatalogue",
    "ModelReference",
    "card_path",
    "read_card",
]
