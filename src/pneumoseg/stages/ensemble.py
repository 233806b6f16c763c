"""What the stages share on an ensemble config (``ensemble.members``, :func:`pneumoseg.config.ensemble_members`).

* Training the members (:func:`train_members`, ``scripts/train_members.py``): stages 00-03 of each member in turn;
  each stage skips what is complete, so members on the same data share stages 00-02 and a trained member is not
  retrained.
* Checking them before they are blended (:func:`trained_members`): every member finished stage 03, on the
  ensemble's prepared data, with the same ``03_train/folds.csv``, since out-of-fold maps blend only when each image
  is held out by the same fold in every member.
* The candidates stage 04 scores (:func:`combinations`): every member alone, every pair (with more than two
  members) and all members; and the choice it writes to ``04_search/ensemble.json`` (:func:`write_choice`), which
  stages 05 and 06 read back (:func:`chosen_members`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from pneumoseg import layout, stage_table
from pneumoseg.config import EnsembleMember, ensemble_members, is_ensemble
from pneumoseg.data.fold_table import FOLD_COLUMN, read_trained_folds
from pneumoseg.data.labels import ID_COLUMN
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import read_json, write_json
from pneumoseg.stage_table import command
from pneumoseg.stages import convert, demo_data, prepare_labels, train
from pneumoseg.stages.record import require_finished

log = logging.getLogger(__name__)


def train_members(cfg: DictConfig, force: bool = False) -> list[dict[str, Any]]:
    """Run stages 00-03 for every member of an ensemble, in order; complete stages are skipped.

    Args:
        cfg: the ensemble's resolved config.
        force: redo every member's stages (``--force``).

    Returns:
        Per member: its name and whether its stage 03 is complete.
    """
    done = []
    for member in ensemble_members(cfg):
        log.info(
            "ensemble %s: stages 00-03 of member %s (%s)", cfg.experiment, member.name, layout.train_dir(member.cfg)
        )
        for stage in (demo_data, convert, prepare_labels):
            stage.run(member.cfg, force=force)
        with stage_table.tracking(layout.train_dir(member.cfg)):  # scripts/status.py reads it
            summary = train.run(member.cfg, force=force)
        done.append({"member": member.name, "complete": bool(summary["complete"])})
    return done


def train_stage(cfg: DictConfig, args: argparse.Namespace) -> None:
    """``scripts/train_members.py``: train the members and print which are complete.

    Raises:
        ConfigError: ``cfg`` is no ensemble.
    """
    if not is_ensemble(cfg):
        raise ConfigError(
            f"{args.config} has no ensemble section (ensemble.members); train a single experiment with "
            f"{command('03')} --config {args.config}"
        )
    for entry in train_members(cfg, force=args.force):
        print(f"member {entry['member']}: stage 03 {'complete' if entry['complete'] else 'NOT complete'}")


def trained_members(cfg: DictConfig) -> list[EnsembleMember]:
    """The members of an ensemble, checked to be blendable.

    Raises:
        DataError: a member whose stage 03 has not finished, whose prepared data is not the ensemble's, or whose
            ``03_train/folds.csv`` differs from the first member's.
    """
    members = ensemble_members(cfg)
    reference = None
    for member in members:
        require_finished(
            layout.train_dir(member.cfg),
            "03",
            f"stage 03 of ensemble member {member.name!r}",
            f"{command('03', ensemble=True)} --config <the ensemble config> (or {command('03')} on "
            f"the member's config)",
        )
        if str(member.cfg.paths.prepared_dir) != str(cfg.paths.prepared_dir):
            raise DataError(
                f"ensemble member {member.name!r} was prepared in {member.cfg.paths.prepared_dir}, the "
                f"ensemble {cfg.experiment!r} reads {cfg.paths.prepared_dir}: members must share the "
                f"ensemble's data (the same data.name and paths); fix the member's or the ensemble's "
                f"data section"
            )
        folds = _fold_table(member.cfg)
        if reference is None:
            reference = (member, folds)
        elif not folds.equals(reference[1]):
            raise DataError(
                f"ensemble members {reference[0].name!r} and {member.name!r} were trained on different "
                f"folds: {layout.train_folds_path(reference[0].cfg)} and "
                f"{layout.train_folds_path(member.cfg)} differ, and out-of-fold maps blend only on the "
                f"same folds. Retrain one of them on the other's prepared data "
                f"({command('03')} --config <its config> --force)"
            )
    return members


def _fold_table(cfg: DictConfig) -> pd.DataFrame:
    """A member's ``folds.csv`` (:func:`pneumoseg.data.fold_table.read_trained_folds`) as ``(ImageId, fold)`` rows in
    ImageId order, for comparing two of them."""
    table = read_trained_folds(cfg)
    return table[[ID_COLUMN, FOLD_COLUMN]].sort_values(ID_COLUMN, kind="stable").reset_index(drop=True)


def combinations(n_members: int) -> list[tuple[int, ...]]:
    """The member subsets stage 04 scores, as index tuples: each member alone, each pair when there are more than
    two members (as nnU-Net's ``find_best_configuration``), and all of them; in that order, which breaks ties
    towards fewer members."""
    pairs = list(itertools.combinations(range(n_members), 2)) if n_members > 2 else []
    return [(i,) for i in range(n_members)] + pairs + [tuple(range(n_members))]


def best_candidate(candidates: Sequence[dict[str, Any]]) -> int:
    """The index of the candidate with the best nested score (the OOF score where there is no nested estimate,
    with a single fold); the first of equals."""

    def score(candidate: dict[str, Any]) -> float:
        nested = candidate["nested_score"]
        return candidate["oof_score"] if nested is None else nested

    best = max(score(c) for c in candidates)
    return next(k for k, c in enumerate(candidates) if score(c) == best)


def write_choice(
    cfg: DictConfig, members: Sequence[EnsembleMember], candidates: list[dict[str, Any]], chosen: int
) -> dict[str, Any]:
    """Write ``04_search/ensemble.json`` and return its content.

    Args:
        cfg: the ensemble's config.
        members: all its members.
        candidates: per scored subset: ``members`` (names), ``weights``, ``oof_score``, ``nested_score``,
            ``postprocess`` (the block chosen on it).
        chosen: the index of the chosen candidate.
    """
    content = {
        "ensemble": str(cfg.experiment),
        "members": [
            {
                "name": m.name,
                "weight": m.weight,
                "experiment_dir": str(m.cfg.paths.experiment_dir),
                "model": str(m.cfg.model.params.get("encoder_name", m.cfg.model.name)),
                "image_size": int(m.cfg.train.image_size),
            }
            for m in members
        ],
        "candidates": candidates,
        "chosen": candidates[chosen],
    }
    write_json(layout.ensemble_path(cfg), content)
    return content


def chosen_members(cfg: DictConfig) -> list[EnsembleMember]:
    """The members stage 04 chose for an ensemble (its ``ensemble.json``), with their configured weights.

    Raises:
        DataError: stage 04 has not run on the ensemble, or chose a member the config no longer has.
    """
    path = layout.ensemble_path(cfg)
    choice = read_json(
        path,
        missing=f"{path} not found: stage 04 has not chosen the ensemble's members; run "
        f"{command('04')} on the ensemble config first",
        invalid_fix=f"rerun {command('04')} --force on the ensemble config",
    )
    by_name = {m.name: m for m in trained_members(cfg)}
    names = choice.get("chosen", {}).get("members", []) if isinstance(choice, dict) else []
    unknown = [name for name in names if name not in by_name]
    if not names or unknown:
        raise DataError(
            f"{path} chose the members {names}, but the ensemble config has {sorted(by_name)}; rerun "
            f"{command('04')} --force on the ensemble config"
        )
    return [by_name[name] for name in names]
