"""What the stages share on an ensemble config (``ensemble.members``, :func:`pneumoseg.config.ensemble_members`).

* Training the members (:func:`train_members`, ``scripts/train_members.py``): stages 00-03 of each member in turn;
  each stage skips what is complete, so members on the same data share stages 00-02 and a trained member is not
  retrained.
* The candidates stage 04 scores (:func:`combinations`): every member alone, every pair (with more than two
  members) and all members; and the choice it writes to ``04_search/ensemble.json`` (:func:`write_choice`), which
  stages 05 and 06 and ``pneumoseg predict`` read back.

Checking the members before they are blended and reading the choice back live below the stages, with the predictor
they build (:mod:`pneumoseg.inference.experiments`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from pneumoseg import layout, stage_table
from pneumoseg.config import EnsembleMember, ensemble_members, is_ensemble
from pneumoseg.errors import ConfigError
from pneumoseg.io import write_json
from pneumoseg.stage_table import command
from pneumoseg.stages import convert, demo_data, prepare_labels, train

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
