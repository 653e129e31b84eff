"""A training campaign in legs, run by one command and resumed by running the same command again.

A CPU campaign trains for hours or days. ``train --legs N`` runs N legs back to back, each started
from the previous leg's exported weights (``--init``), so that a crash, a reboot or ``kill -9``
costs at most the part of one leg since its last round (its checkpoint), and every finished leg's
weights can be committed or copied to another machine while the next one runs. A stop request
(``SIGTERM`` or Ctrl-C to ``train``) ends the running leg at its next step as a finished leg, so
what it learned is kept, and ends the campaign; the same command again goes on with the next leg.

Layout of the campaign folder (``--out``)::

    OUT/campaign.json        the plan (the options every leg shares) and the finished legs
    OUT/leg_001/ ...         each leg's own training folder: checkpoint, weights, card, curves
    OUT/NAME.safetensors     the last finished leg's weights and card (copied when a leg ends)
    OUT/campaign.png         each leg's final validation against cumulative hours

A leg is finished when its folder holds its model card (``train`` writes the weights, then the
card, at the very end of a leg). Leg k trains with seed ``seed + k - 1``, so legs draw fresh slabs
and patches. The plotting of a campaign's cards lives here too (``scripts/plot_campaign.py``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from matplotlib.figure import Figure

from IPv2DenoiseLib.core.atomic import atomic_path, make_output_folder, save_figure
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback, StopRequest
from IPv2DenoiseLib.denoiser.weights import card_path, sha256_file
from IPv2DenoiseLib.training.trainer import TrainConfig, check_config, train

#: The campaign folder's record of its plan and finished legs.
CAMPAIGN_FILE = "campaign.json"
#: How a leg ends as planned (a model card's ``stopped_by``); anything else is a stop request (a signal).
STOPPED_ON_PLAN = ("iterations", "max_minutes", None)
#: Options that may change between runs of one campaign: a leg's length, and where and how fast it
#: runs (a campaign moves to another machine, or to a GPU).
#: ``val_anatomy`` may change too: held-out volumes change nothing in the training, and each leg's
#: card names its own (a "held-out" volume found in the training, docs/training.md, must be dropped).
_FREE_KEYS = ("iterations", "max_minutes", "out", "device", "data_workers", "val_anatomy")
#: Options that name files: compared by name, since another machine keeps them elsewhere (the
#: model cards name the volumes the same way).
_PATH_KEYS = ("cases", "val_cases", "anatomy", "val_anatomy", "init_weights", "weak_denoiser")
#: The validation keys a campaign is plotted by: the cases' own 2 % scans, the fixed scanner
#: protocol, and held-out real anatomy under projection-domain noise.
SERIES = (
    ("psnr_label", "own 2 % scans"),
    ("scanner_psnr_label", "scanner protocol"),
    ("real_projection_psnr_label_body", "held-out real anatomy"),
)


def leg_folder(out: str | Path, leg: int) -> Path:
    """The training folder of leg ``leg`` (1-based) of the campaign in ``out``."""
    return Path(out) / f"leg_{leg:03d}"


def leg_points(card: dict) -> list[tuple[float, dict]]:
    """(cumulative wall hours at the leg's end, that leg's validation) for every leg of a card."""
    points, hours = [], 0.0
    for leg in card.get("legs", []):
        hours += float(leg.get("wall_seconds", 0.0)) / 3600.0
        points.append((hours, leg.get("validation", {})))
    return points


def held_out_sets(card: dict) -> list[int]:
    """For every leg of a card, the number (1, 2, ...) of the held-out real volumes its validation
    was measured on: it grows where a leg names other volumes than the leg before (a "held-out"
    volume found in the training and dropped, docs/training.md), since the figures on either side
    are then not comparable. A leg that names none (a soup without ``--val-anatomy``) keeps the set
    before it (its list is absent or empty); volumes are compared by file name, as everywhere in a
    campaign."""
    numbers: list[int] = []
    names: tuple[str, ...] | None = None
    for leg in card.get("legs", []):
        listed = (leg.get("data") or {}).get("validation_real")
        here = tuple(sorted(Path(str(v)).name for v in listed)) if listed else names
        changed = names is not None and here != names
        numbers.append((numbers[-1] if numbers else 1) + changed)
        names = here
    return numbers


def campaign_table(cards: Sequence[tuple[str, dict]]) -> list[str]:
    """A Markdown table: one row per leg of each (name, card), hours, the :data:`SERIES` and the
    held-out set the real-anatomy figure was measured on (:func:`held_out_sets`)."""
    rows = [
        "| model | leg | hours (cumulative) | "
        + " | ".join(f"{title} (dB)" for _, title in SERIES)
        + " | held-out set |",
        "|---|---:|---:|" + "---:|" * len(SERIES) + "---:|",
    ]
    for name, card in cards:
        sets = held_out_sets(card)
        for number, (hours, val) in enumerate(leg_points(card), start=1):
            cells = " | ".join(f"{val.get(key, math.nan):.2f}" for key, _ in SERIES)
            rows.append(f"| {name} | {number} | {hours:.1f} | {cells} | {sets[number - 1]} |")
    return rows


def plot_campaign(cards: Sequence[tuple[str, dict]], out: str | Path) -> None:
    """Plot each leg's final validation against cumulative wall hours, one line per (name, card).

    Written atomically; a series no leg validated on (no held-out real anatomy) is left out.
    """
    shown = [
        (key, title)
        for key, title in SERIES
        if any(key in val for _, card in cards for _, val in leg_points(card))
    ]
    fig = Figure(figsize=(5 * max(1, len(shown)), 3.8))
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False)[0]
    for name, card in cards:
        points = leg_points(card)
        sets = held_out_sets(card)
        # the --baseline weights validated beside each leg (the model to beat), where given
        bases = [leg.get("validation_baseline") or {} for leg in card.get("legs", [])]
        for ax, (key, title) in zip(axes, shown):
            # the held-out real anatomy's line breaks where its volumes change (not comparable)
            groups = sorted(set(sets)) if key.startswith("real_") else [None]
            line = None
            for group in groups:
                # a soup written without validation has no point; the line joins its neighbours
                legs = [
                    i
                    for i in range(len(points))
                    if (group is None or sets[i] == group) and key in points[i][1]
                ]
                if not legs:
                    continue
                line = ax.plot(
                    [points[i][0] for i in legs],
                    [points[i][1][key] for i in legs],
                    marker="o" if group in (None, 1) else "s",
                    color=None if line is None else line[0].get_color(),
                    label=name
                    if group in (None, 1)
                    else f"{name}: from leg {legs[0] + 1}, other held-out volumes",
                )
            if any(key in b for b in bases):
                ax.plot(
                    [h for h, _ in points],
                    [b.get(key, math.nan) for b in bases],
                    linestyle="--",
                    marker="x",
                    color=None if line is None else line[0].get_color(),
                    label=f"{name}: baseline {next(b['weights'] for b in bases if key in b)}",
                )
            ax.set(xlabel="wall hours (cumulative)", ylabel="PSNR (dB)", title=title)
    # one legend under the panels: inside each panel six or more entries hid the curves
    entries: dict[str, object] = {}
    for ax in axes:
        ax.grid(alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    columns = min(3, max(1, len(entries)))
    rows = math.ceil(len(entries) / columns)
    fig.set_figheight(3.8 + 0.25 * rows)
    fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=columns, fontsize=8)
    fig.suptitle("training campaign: validation at the end of each leg")
    fig.tight_layout(rect=(0, (0.06 + 0.055 * rows) * 3.8 / (3.8 + 0.25 * rows), 1, 1))
    save_figure(fig, out)


def _plan(config: TrainConfig) -> dict:
    """The options every leg of the campaign shares (JSON), for the check on resume."""
    plan = json.loads(json.dumps(asdict(config)))
    for key in _FREE_KEYS:
        plan.pop(key, None)
    for key in _PATH_KEYS:
        value = plan.get(key)
        if isinstance(value, list):
            plan[key] = [Path(v).name for v in value]
        elif value:
            plan[key] = Path(value).name
    return plan


def _write_json(path: Path, record: dict) -> None:
    with atomic_path(path) as tmp:  # strict JSON: a NaN would make the record unreadable elsewhere
        Path(tmp).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def finished_legs(out: str | Path, name: str) -> list[dict]:
    """The model cards of the campaign's finished legs, in order (leg 1 first)."""
    cards = []
    while (card := card_path(leg_folder(out, len(cards) + 1) / f"{name}.safetensors")).is_file():
        try:
            cards.append(json.loads(card.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{card} is not a readable model card ({exc}); delete it to train that leg again "
                "from its checkpoint"
            ) from None
    return cards


def check_campaign(config: TrainConfig, legs: int) -> dict | None:
    """Refuse, in one line and before any data is read, a campaign that cannot run; the record of
    the campaign already in ``config.out`` (None for a new one)."""
    check_config(config)
    if legs < 1:
        raise UserError(f"--legs {legs}: need 1 or more")
    record_path = Path(config.out) / CAMPAIGN_FILE
    if not record_path.is_file():
        if leg_folder(config.out, 1).exists():
            raise UserError(
                f"{config.out} holds legs but no {CAMPAIGN_FILE}: not a campaign; use a new --out"
            )
        plain = [f"{config.name}.safetensors", "checkpoint.pt"]
        if found := [f for f in plain if (Path(config.out) / f).exists()]:
            raise UserError(
                f"{config.out} holds a training run ({found[0]}) but no {CAMPAIGN_FILE}: not a campaign, "
                "and its model would be overwritten; use a new --out"
            )
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        saved = dict(record["plan"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{record_path} is not a campaign record ({exc}); use a new --out") from None
    current = _plan(config)
    for key in _FREE_KEYS:  # a record written before a key became free keeps it
        saved.pop(key, None)
    if finished_legs(config.out, config.name):  # leg 1 is done: where it started no longer matters
        saved.pop("init_weights", None)
        current.pop("init_weights", None)
    differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differ:
        raise UserError(
            f"{config.out} is a campaign with other options ({', '.join(differ)} differ); "
            "continue it with the same options (--legs, --iterations, --max-minutes, --device, "
            "--data-workers and --val-anatomy may change; files are compared by name) "
            "or use a new --out"
        )
    return record


def run_campaign(
    config: TrainConfig,
    legs: int,
    *,
    progress_for_leg: Callable[[int], ProgressCallback | None] | None = None,
    cancel: CancelToken | None = None,
    stop: StopRequest | None = None,
    baseline: str | Path | None = None,
    notice: Callable[[str], None] | None = None,
) -> dict:
    """Train until the campaign in ``config.out`` has ``legs`` finished legs; the last leg's card.

    ``config`` describes one leg (its length: ``max_minutes`` and/or ``iterations``); leg 1 starts
    from ``config.init_weights`` (or a fresh network), every later leg from the leg before. Legs
    already finished are skipped and a leg cut short resumes from its checkpoint, so running the
    same command again continues the campaign. ``progress_for_leg(k)`` gives leg k's progress.
    A ``stop`` request ends the running leg early as a finished leg and the campaign after it.
    ``baseline`` weights (e.g. the shipped model) are validated beside every leg on the same sets,
    and each leg's summary gives its difference to them.
    """
    record = check_campaign(config, legs)  # before any data is read
    out = make_output_folder(config.out, what="--out")  # a file there is refused in one line
    if record is None:
        record = {"plan": _plan(config), "legs": []}
        _write_json(out / CAMPAIGN_FILE, record)
    say = notice or (lambda line: None)
    cards = finished_legs(out, config.name)
    if cards and not _published(out, config.name, cards, record):
        # killed between a leg's end and its publication: the last finished leg is the campaign's
        _publish(out, config.name, cards, record)
        say(f"campaign {out}: {config.name}.safetensors and {CAMPAIGN_FILE} brought up to leg {len(cards)}")
    if len(cards) >= legs:
        say(f"campaign {out}: {len(cards)} leg(s) already finished, none to run (raise --legs to go on)")
    while len(cards) < legs:
        number = len(cards) + 1
        start_from = (
            str(leg_folder(out, number - 1) / f"{config.name}.safetensors") if cards else config.init_weights
        )
        leg_config = replace(
            config, out=str(leg_folder(out, number)), init_weights=start_from, seed=config.seed + number - 1
        )
        say(f"campaign {out}: leg {number} of {legs}, from {start_from or 'a fresh network'}")
        bar = progress_for_leg(number) if progress_for_leg else None
        try:
            train(leg_config, progress=bar, cancel=cancel, stop=stop, baseline=baseline, notice=notice)
        finally:
            getattr(bar, "close", lambda: None)()  # a tqdm bar per leg
        weights = leg_folder(out, number) / f"{config.name}.safetensors"
        card = json.loads(card_path(weights).read_text(encoding="utf-8"))  # as written: weights, sha256
        cards.append(card)
        _publish(out, config.name, cards, record)
        say(f"campaign {out}: leg {number} finished: {record['legs'][-1]['summary']}")
        if stop is not None and stop.requested:
            say(
                f"campaign {out}: stopped after leg {number} ({stop.reason or 'stop request'}); "
                "run the same command again to go on"
            )
            break
    return cards[-1] if cards else {}


def _publish(out: Path, name: str, cards: list[dict], record: dict) -> None:
    """Make the last finished leg the campaign's: its weights and card as ``OUT/NAME.*``, every
    finished leg in ``campaign.json`` (``record``, updated), and the plot. Each file is replaced
    atomically, so a kill between two leaves a state :func:`_published` sees as unfinished."""
    weights = leg_folder(out, len(cards)) / f"{name}.safetensors"
    _copy(weights, out / weights.name)
    _copy(card_path(weights), card_path(out / weights.name))
    record["legs"] = [_leg_summary(i, c) for i, c in enumerate(cards, start=1)]
    _write_json(out / CAMPAIGN_FILE, record)
    plot_campaign([(name, cards[-1])], out / "campaign.png")


def _published(out: Path, name: str, cards: list[dict], record: dict) -> bool:
    """Whether ``OUT/NAME.*`` and ``campaign.json`` are those of the last finished leg."""
    last = cards[-1].get("sha256")
    try:
        card = json.loads(card_path(out / f"{name}.safetensors").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    listed = record.get("legs") or []
    return (
        card.get("sha256") == last
        and (out / f"{name}.safetensors").is_file()
        and sha256_file(out / f"{name}.safetensors") == last
        and len(listed) == len(cards)
        and listed[-1].get("sha256") == last
    )


def _leg_summary(number: int, card: dict) -> dict:
    """One finished leg for ``campaign.json``: where it is, its iterations, time and validation."""
    leg = (card.get("legs") or [{}])[-1]
    val = card.get("validation", {})
    base = card.get("validation_baseline") or {}
    first, last = (leg.get("iterations") or [0, card.get("iterations", 0)])[:2]
    figures = ", ".join(
        f"{title} {val[key]:.2f} dB"
        + (f" ({val[key] - base[key]:+.2f} against {base.get('weights')})" if key in base else "")
        for key, title in SERIES
        if key in val
    )
    minutes = float(leg.get("wall_seconds", card.get("training_seconds", 0.0))) / 60.0
    return {
        "leg": number,
        "weights": f"{leg_folder('.', number).name}/{card.get('weights')}",
        "sha256": card.get("sha256"),
        "iterations": [first, last],
        "wall_seconds": leg.get("wall_seconds"),
        "validation": val,
        **({"validation_baseline": base} if base else {}),
        "stopped_by": leg.get("stopped_by"),
        "summary": f"{last - first} iterations in {minutes:.0f} min"
        + (f" (stopped by {leg['stopped_by']})" if leg.get("stopped_by") not in STOPPED_ON_PLAN else "")
        + f"; {figures or 'no validation set'}",
    }
