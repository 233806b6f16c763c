"""The predictor of an experiment's (or an ensemble's) finished stages 03-04, as stages 05 and 06 and the
``predict`` command load it, and an ensemble's members: those that finished stage 03 on the same data and folds
(:func:`trained_members`, checked before stage 04 blends them) and those stage 04 chose (:func:`chosen_members`,
from its ``04_search/ensemble.json``).
"""
from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.config import EnsembleMember, ensemble_members, is_ensemble
from pneumoseg.errors import DataError
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor, configured_postprocessor
from pneumoseg.io import read_json
from pneumoseg.layout import require_finished


def trained_members(cfg: DictConfig) -> list[EnsembleMember]:
    """The members of an ensemble, checked to be blendable.

    Raises:
        DataError: a member whose stage 03 has not finished, whose prepared data is not the ensemble's, or whose
            ``03_train/folds.csv`` differs from the first member's.
    """
    members = ensemble_members(cfg)
    reference = None
    for member in members:
        require_finished(layout.train_dir(member.cfg), f"stage 03 of ensemble member {member.name!r}",
                         "scripts/train_members.py --config <the ensemble config> (or scripts/03_train.py on "
                         "the member's config)")
        if str(member.cfg.paths.prepared_dir) != str(cfg.paths.prepared_dir):
            raise DataError(f"ensemble member {member.name!r} was prepared in {member.cfg.paths.prepared_dir}, the "
                            f"ensemble {cfg.experiment!r} reads {cfg.paths.prepared_dir}: members must share the "
                            f"ensemble's data (the same data.name and paths); fix the member's or the ensemble's "
                            f"data section")
        folds = _fold_table(layout.train_folds_path(member.cfg))
        if reference is None:
            reference = (member, folds)
        elif not folds.equals(reference[1]):
            raise DataError(f"ensemble members {reference[0].name!r} and {member.name!r} were trained on different "
                            f"folds: {layout.train_folds_path(reference[0].cfg)} and "
                            f"{layout.train_folds_path(member.cfg)} differ, and out-of-fold maps blend only on the "
                            f"same folds. Retrain one of them on the other's prepared data "
                            f"(scripts/03_train.py --config <its config> --force)")
    return members


def _fold_table(path) -> pd.DataFrame:
    """A ``folds.csv`` as ``(ImageId, fold)`` rows in ImageId order, for comparing two of them."""
    if not path.is_file():
        raise DataError(f"{path} not found; run scripts/03_train.py on that member first")
    table = pd.read_csv(path, dtype={"ImageId": str})
    if not {"ImageId", "fold"} <= set(table.columns):
        raise DataError(f"{path} lacks the ImageId and fold columns; retrain that member (scripts/03_train.py --force)")
    return table[["ImageId", "fold"]].sort_values("ImageId", kind="stable").reset_index(drop=True)



def chosen_members(cfg: DictConfig) -> list[EnsembleMember]:
    """The members stage 04 chose for an ensemble (its ``ensemble.json``), with their configured weights.

    Raises:
        DataError: stage 04 has not run on the ensemble, or chose a member the config no longer has.
    """
    path = layout.ensemble_path(cfg)
    choice = read_json(path, missing=f"{path} not found: stage 04 has not chosen the ensemble's members; run "
                                     f"scripts/04_search_thresholds.py on the ensemble config first",
                       invalid_fix="rerun scripts/04_search_thresholds.py --force on the ensemble config")
    by_name = {m.name: m for m in trained_members(cfg)}
    names = choice.get("chosen", {}).get("members", []) if isinstance(choice, dict) else []
    unknown = [name for name in names if name not in by_name]
    if not names or unknown:
        raise DataError(f"{path} chose the members {names}, but the ensemble config has {sorted(by_name)}; rerun "
                        f"scripts/04_search_thresholds.py --force on the ensemble config")
    return [by_name[name] for name in names]


def build_predictor(cfg: DictConfig, device: str | None = None) -> Predictor | EnsemblePredictor:
    """The predictor of stages 05 and 06 and of the predict command: the experiment's
    (:meth:`Predictor.from_experiment`), or an ensemble's chosen members blended with the ensemble's post-processing
    (:meth:`EnsemblePredictor.from_experiments`)."""
    if not is_ensemble(cfg):
        return Predictor.from_experiment(cfg, device)
    members = [(m.cfg, m.weight) for m in chosen_members(cfg)]
    return EnsemblePredictor.from_experiments(members, configured_postprocessor(cfg), device or cfg.predict.device)
