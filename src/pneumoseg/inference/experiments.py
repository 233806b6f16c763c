"""The predictor of a config whose stages 03-04 have finished: an experiment's fold ensemble, or an ensemble config's
chosen members blended (:func:`build_predictor`). Stage 05, stage 06 and ``pneumoseg predict --model CONFIG``
(:mod:`pneumoseg.inference.folder`) predict with it.

On an ensemble config (``ensemble.members``, :func:`pneumoseg.config.ensemble_members`):

* :func:`trained_members` checks the members before they are blended: every member finished stage 03, on the
  ensemble's prepared data, with the same ``03_train/folds.csv``, since out-of-fold maps blend only when each image
  is held out by the same fold in every member (stage 04 blends them);
* :func:`chosen_members` reads back the members stage 04 chose (``04_search/ensemble.json``, written by
  :func:`pneumoseg.stages.ensemble.write_choice`).
"""

from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.config import EnsembleMember, ensemble_members, is_ensemble
from pneumoseg.data.fold_table import FOLD_COLUMN, read_trained_folds
from pneumoseg.data.labels import ID_COLUMN
from pneumoseg.errors import DataError
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor, configured_postprocessor
from pneumoseg.io import read_json
from pneumoseg.stage_table import command, require_finished


def build_predictor(
    cfg: DictConfig, device: str | None = None, runtime: str | None = None
) -> Predictor | EnsemblePredictor:
    """The predictor of an experiment or ensemble config: the experiment's (:meth:`Predictor.from_experiment`), or
    an ensemble's chosen members (:func:`chosen_members`) blended with the ensemble's post-processing
    (:meth:`EnsemblePredictor.from_experiments`).

    Args:
        cfg: the resolved experiment or ensemble config.
        device: ``auto``, ``cpu`` or ``cuda``; default ``predict.device``.
        runtime: instead of ``predict.runtime`` (stage 06 exports torch models).

    Raises:
        DataError: stage 03 (of the experiment, or of a chosen member) has not finished, stage 04 has not chosen an
            ensemble's members, or a checkpoint or ``thresholds.json`` is missing.
        ConfigError: a bad ``predict`` section.
    """
    if not is_ensemble(cfg):
        require_finished(layout.train_dir(cfg), "03")
        return Predictor.from_experiment(cfg, device, runtime=runtime)
    members = [(m.cfg, m.weight) for m in chosen_members(cfg)]
    return EnsemblePredictor.from_experiments(
        members,
        configured_postprocessor(cfg),
        device or cfg.predict.device,
        runtime or str(cfg.predict.get("runtime", "auto")),
    )


def trained_members(cfg: DictConfig) -> list[EnsembleMember]:
    """The members of an ensemble, checked to be blendable.

    Args:
        cfg: the ensemble's resolved config.

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


def chosen_members(cfg: DictConfig) -> list[EnsembleMember]:
    """The members stage 04 chose for an ensemble (its ``ensemble.json``), with their configured weights, checked by
    :func:`trained_members`.

    Args:
        cfg: the ensemble's resolved config.

    Raises:
        DataError: stage 04 has not run on the ensemble, or chose a member the config no longer has; or as
            :func:`trained_members`.
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
