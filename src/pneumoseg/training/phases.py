"""Training phases: one experiment trains each fold in several parts, one after another, each starting from the
weights the part before it ended with (its best checkpoint), as the 1st place trained part0 -> part1 -> part2 and
uptrained its 1024 px models from 512 px ones.

``train.phases`` is a list; each entry is ``{name, <section>: {...}, ...}``, a change of the experiment's config for
that phase, in the sections ``train``, ``optimizer``, ``scheduler``, ``sampler``, ``augment``, ``loss`` and
``data`` (its crop keys only)::

    train:
      phases:
        - {name: small, train: {image_size: 512, epochs: 20}}
        - {name: full, train: {epochs: 10, freeze_encoder_epochs: 2}, optimizer: {params: {lr: 1.0e-5}}}

Each phase is the experiment's config with its changes merged in (a ``{name, params}`` block renamed by a phase
takes its params from the phase alone, as in config files), so a phase lists only what differs. The first phase
starts as the experiment would (``train.init_from`` or the built weights); every later one from the best checkpoint
of the phase before. The last phase must train at the experiment's ``train.image_size``: it is the fold's model.

Folders: the last phase writes into the fold's folder itself (its checkpoints, ``log.csv``, ``oof/``), so stages
04, 05 and 06 read it as they read any fold; the earlier phases write into ``fold<k>/phases/<i>_<name>/`` (their
own ``log.csv``, checkpoints and ``last.pt``, no OOF maps), with a ``phase_done.json`` once finished. A killed run
continues in the phase it was in, after that phase's last finished epoch; finished phases are not retrained.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from pneumoseg.config import to_dict
from pneumoseg.data.dataset import PreparedData
from pneumoseg.errors import ConfigError
from pneumoseg.io import write_json
from pneumoseg.modeling.checkpoints import best_files
from pneumoseg.training.distributed import DistContext
from pneumoseg.training.trainer import fit_fold

log = logging.getLogger(__name__)

PHASE_SECTIONS = ("train", "optimizer", "scheduler", "sampler", "augment", "loss", "data")
PHASE_DATA_KEYS = ("train_crop", "crop_lesion_share")
PHASES_DIR = "phases"
PHASE_DONE = "phase_done.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Phase:
    """One phase of a fold's training.

    Attributes:
        index: its place, 0-based.
        name: its name (``train.phases[i].name``; ``""`` for a run without phases).
        changes: its changes of the experiment's config.
        last: whether it is the last phase (the fold's model).
    """

    index: int
    name: str
    changes: dict[str, Any]
    last: bool

    def folder(self, fold_folder: Path) -> Path:
        """Where the phase writes: the fold's folder for the last phase, else ``phases/<index>_<name>/`` in it."""
        return fold_folder if self.last else fold_folder / PHASES_DIR / f"{self.index}_{self.name}"

    def fingerprint(self, fold_fingerprint: str) -> str:
        """The phase's resume key: the fold's, and the phase's place when there are phases."""
        return fold_fingerprint if not self.name else f"{fold_fingerprint}/phase{self.index}"


def _check_changes(base: dict, changes: dict, where: str) -> None:
    """Refuse a key the experiment's config does not have (a typo), below a mapping of the config; a ``params``
    block and a key whose value is not a mapping (null, a number, a list) take any value."""
    for key, value in changes.items():
        if key not in base:
            raise ConfigError(f"{where}.{key}: no such key in the config; check its spelling (see configs/base.yaml)")
        if isinstance(value, dict) and isinstance(base[key], dict) and key != "params":
            _check_changes(base[key], value, f"{where}.{key}")


def plan_phases(cfg: DictConfig) -> list[Phase]:
    """The phases of ``train.phases`` (one unnamed phase, the config itself, when there are none), checked.

    Raises:
        ConfigError: an entry without a usable name, a repeated name, a section a phase cannot change, a key the
            config does not have, or a last phase at another size than ``train.image_size``.
    """
    entries = cfg.train.get("phases")
    if not entries:
        return [Phase(0, "", {}, True)]
    base = to_dict(cfg)
    phases, names = [], set()
    for index, entry in enumerate(entries):
        entry = to_dict(entry) if isinstance(entry, DictConfig) else dict(entry or {})
        where = f"train.phases[{index}]"
        name = str(entry.pop("name", ""))
        if not _NAME.match(name) or name in names:
            raise ConfigError(
                f"{where}: needs a name of letters, digits, '_', '.' or '-', unique among the phases; got {name!r}"
            )
        names.add(name)
        outside = [key for key in entry if key not in PHASE_SECTIONS]
        crop_keys = [key for key in (entry.get("data") or {}) if key not in PHASE_DATA_KEYS]
        if outside or crop_keys or "phases" in (entry.get("train") or {}):
            raise ConfigError(
                f"{where}: a phase changes only {', '.join(PHASE_SECTIONS)} (data: "
                f"{', '.join(PHASE_DATA_KEYS)}; not train.phases); got {outside + crop_keys or 'phases'}"
            )
        _check_changes(base, entry, where)
        phases.append(Phase(index, name, entry, index == len(entries) - 1))
    for phase in phases:
        epochs = phase_config(cfg, phase, None).train.epochs
        if int(epochs) < 1:
            raise ConfigError(
                f"train.phases[{phase.index}] ({phase.name}): train.epochs must be at least 1, got {epochs}"
            )
    size = phase_config(cfg, phases[-1], None).train.image_size
    if int(size) != int(cfg.train.image_size):
        raise ConfigError(
            f"train.phases: the last phase trains at {size} px but train.image_size is "
            f"{cfg.train.image_size}: the last phase is the fold's model, which stages 04-06 use at "
            f"train.image_size; train the other size in an earlier phase"
        )
    return phases


def phase_config(cfg: DictConfig, phase: Phase, start: Path | None) -> DictConfig:
    """The config a phase trains with: the experiment's with the phase's changes, without ``train.phases``, and
    ``train.init_from`` the checkpoint ``start`` (the phase before's best) when given."""
    if not phase.name:
        return cfg
    base = to_dict(cfg)
    for section, block in phase.changes.items():
        old = base.get(section)
        if isinstance(block, dict) and isinstance(old, dict) and block.get("name", old.get("name")) != old.get("name"):
            old.pop("params", None)  # a renamed block takes its params from the phase alone
    merged = cast(DictConfig, OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(phase.changes)))
    merged.train.phases = None
    if start is not None:
        merged.train.init_from = {"checkpoint": str(start), "partial": False}
    OmegaConf.set_readonly(merged, True)
    return merged


def _phase_summary(phase: Phase, summary: dict[str, Any]) -> dict[str, Any]:
    best = summary.get("best", {})
    return {
        "name": phase.name,
        "epochs": summary.get("epochs"),
        "best_epoch": summary.get("best_epoch"),
        "val_dice": best.get("val_dice"),
        "seconds": summary.get("seconds"),
    }


def fit_phases(
    cfg: DictConfig,
    data: PreparedData,
    fold: int,
    folder: Path,
    ctx: DistContext,
    resume: bool | str,
    fingerprint: str,
    load_data: Callable[[int], PreparedData],
) -> dict[str, Any]:
    """Train fold ``fold`` through its phases (see the module docstring) -> the last phase's fold summary
    (:func:`pneumoseg.training.trainer.fit_fold`); with phases, also ``phases`` (each phase's name, epochs, best
    epoch, val_dice and seconds) and ``seconds`` the sum over the phases.

    Args:
        cfg, fold, folder, ctx, resume, fingerprint: as for :func:`pneumoseg.training.trainer.fit_fold`.
        data: the prepared data at ``train.image_size``.
        load_data: the prepared data at another size (a phase's ``train.image_size``).
    """
    phases = plan_phases(cfg)
    done: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    start: Path | None = None
    for phase in phases:
        phase_cfg = phase_config(cfg, phase, start)
        size = int(phase_cfg.train.image_size)
        phase_data = data if size == int(cfg.train.image_size) else load_data(size)
        where, key = phase.folder(Path(folder)), phase.fingerprint(fingerprint)
        finished = None if phase.last or resume is False else _finished(where, key)
        if finished is None:
            log.info("fold %d: phase %d/%d %s", fold, phase.index + 1, len(phases), phase.name)
        summary = (
            finished
            if finished is not None
            else _train_phase(phase, phase_cfg, phase_data, fold, where, ctx, resume, key)
        )
        done.append(_phase_summary(phase, summary))
        start = best_files(where)[0]
    if not phases[0].name:
        return summary
    seconds = [phase["seconds"] for phase in done]
    total = round(sum(seconds), 1) if None not in seconds else None  # the fold's training time, every phase's
    return {**summary, "phases": done, "seconds": total}


def _train_phase(
    phase: Phase,
    cfg: DictConfig,
    data: PreparedData,
    fold: int,
    folder: Path,
    ctx: DistContext,
    resume: bool | str,
    key: str,
) -> dict[str, Any]:
    """Train one phase into ``folder`` (:func:`pneumoseg.training.trainer.fit_fold`, the OOF maps only for the
    last) and mark an earlier phase finished -> its summary."""
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PHASE_DONE).unlink(missing_ok=True)
    ctx.barrier()
    summary = fit_fold(cfg, data, fold, folder, ctx, resume=resume, fingerprint=key, predict_oof=phase.last)
    if ctx.is_main and not phase.last:
        write_json(folder / PHASE_DONE, {"fingerprint": key, "summary": summary})
    ctx.barrier()
    return summary


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The summary of a finished earlier phase written for ``key``, or None."""
    try:
        stored = json.loads((folder / PHASE_DONE).read_text())
    except (OSError, ValueError):  # absent or unreadable: the phase is trained (again)
        return None
    if not isinstance(stored, dict) or stored.get("fingerprint") != key:
        return None
    log.info("%s: phase finished for this config; not retrained", folder)
    return stored.get("summary") or {}
