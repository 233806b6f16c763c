"""search.objective: the best Dice subject to an image-level sensitivity or specificity, exact like the rest of
the search."""

import numpy as np
import pandas as pd
import pytest

from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.postprocess.search import GRIDS, Objective, build_objective, evaluate, run_search
from pneumoseg.postprocess.strategies import build_postprocessor
from pneumoseg.reports.oof import best_dice_by_sensitivity
from synthetic_oof import ArraySource
from test_search import GRID_BLOCKS, _oof


def _brute_force(source, strategies, gates):
    """Every candidate applied image by image: its mean Dice, image-level sensitivity and specificity."""
    pred, inter, true = evaluate(source, strategies, gates=gates)
    positive = true > 0
    return (
        dice_from_counts(inter, pred, true[:, None]).mean(0),
        (pred[positive] > 0).mean(0),
        (pred[~positive] == 0).mean(0),
    )


@pytest.mark.parametrize(
    "rate, minimum, seed", [("sensitivity", 0.9, 1), ("specificity", 0.85, 5), ("sensitivity", 1.0, 1)]
)
def test_constrained_choice_equals_a_brute_force_over_every_candidate(rate, minimum, seed):
    source, groups = _oof(seed=seed, specks=2)
    gates = np.random.default_rng(seed).random(len(groups))
    grids = [GRIDS.build(b) for b in GRID_BLOCKS]
    result = run_search(
        source,
        groups,
        grids,
        refine_steps=1,
        gates=gates,
        gate_thresholds=[0.2, 0.5],
        objective=Objective(rate, minimum),
    )
    strategies = [build_postprocessor(result.block(row)) for row in range(len(result.candidates))]
    dice, sensitivity, specificity = _brute_force(source, strategies, gates)
    assert np.abs(result.candidates["sensitivity"] - sensitivity).max() < 1e-12
    assert np.abs(result.candidates["specificity"] - specificity).max() < 1e-12
    rates = sensitivity if rate == "sensitivity" else specificity
    assert (rates >= minimum).any() and not (rates >= minimum).all()  # the constraint binds
    assert result.candidates["dice"].iloc[result.best] == pytest.approx(dice[rates >= minimum].max(), abs=1e-12)
    assert rates[result.best] >= minimum


def test_nested_estimate_reports_how_often_the_held_out_folds_met_the_constraint():
    source, groups = _oof(seed=1, specks=2)
    grids = [GRIDS.build(b) for b in GRID_BLOCKS]
    objective = Objective("sensitivity", 0.9)
    nested = run_search(source, groups, grids, refine_steps=1, objective=objective).nested
    met = []
    for g in range(3):
        train, held = groups != g, groups == g
        alone = run_search(
            ArraySource(source.levels[train], source.truth[train]),
            np.zeros(train.sum(), int),
            grids,
            refine_steps=1,
            objective=objective,
        )
        assert nested.choices[g] == alone.block(alone.best)
        dice, sensitivity, _ = _brute_force(
            ArraySource(source.levels[held], source.truth[held]), [build_postprocessor(nested.choices[g])], None
        )
        assert nested.scores[g] == pytest.approx(dice[0], abs=1e-9)
        met.append(sensitivity[0] >= 0.9)
    assert nested.met.tolist() == met and nested.met_share == np.mean(met)


def test_unreachable_constraint_falls_back_to_the_highest_rate():
    source, groups = _oof(seed=1, specks=2)
    grid = GRIDS.build({"name": "threshold", "params": {"threshold": [0.05, 0.1, 0.15], "min_area": [100]}})
    result = run_search(source, groups, [grid], objective=Objective("specificity", 1.0))
    specificity = result.candidates["specificity"].to_numpy()
    assert specificity.max() < 1.0 and specificity[result.best] == specificity.max()


def test_best_dice_by_sensitivity_is_a_running_maximum():
    candidates = pd.DataFrame({"sensitivity": [0.2, 0.5, 0.5, 0.9, 1.0], "dice": [0.8, 0.7, 0.85, 0.6, 0.5]})
    levels, best = best_dice_by_sensitivity(candidates)
    assert levels.tolist() == [0.2, 0.5, 0.9, 1.0] and best.tolist() == [0.85, 0.85, 0.6, 0.5]


@pytest.mark.parametrize(
    "block, message",
    [
        ({"name": "auc"}, "must be one of"),
        ({"name": "dice_at_sensitivity", "params": {}}, "min_sensitivity"),
        ({"name": "dice_at_specificity", "params": {"min_specificity": 1.5}}, "rate in"),
        ({"name": "dice_at_sensitivity", "params": {"min_specificity": 0.9}}, "min_sensitivity"),
    ],
)
def test_bad_objectives_are_config_errors(block, message):
    with pytest.raises(ConfigError, match=message):
        build_objective(block)
    assert build_objective({"name": "dice_at_sensitivity", "params": {"min_sensitivity": 0.9}}).to_block() == {
        "name": "dice_at_sensitivity",
        "params": {"min_sensitivity": 0.9},
    }


def test_stage_04_searches_under_the_configured_objective(tiny_cfg):
    import json

    from pneumoseg import layout
    from pneumoseg.stages import search as stage
    from synthetic_oof import write_oof_experiment

    cfg = tiny_cfg("search.objective.name=dice_at_sensitivity", "+search.objective.params.min_sensitivity=0.95")
    write_oof_experiment(cfg, n_images=40, oof_size=32)
    numbers = stage.run(cfg)
    folder = layout.search_dir(cfg)
    per_image = pd.read_csv(folder / "per_image.csv")
    positive = per_image["true_area"] > 0
    sensitivity = (per_image.loc[positive, "pred_area"] > 0).mean()
    candidates = pd.read_csv(folder / "candidates.csv")
    assert sensitivity >= 0.95 or sensitivity == candidates["sensitivity"].max()
    assert numbers["detection"]["operating_point"]["sensitivity"]["value"] == pytest.approx(sensitivity)
    assert numbers["objective"] == {"name": "dice_at_sensitivity", "params": {"min_sensitivity": 0.95}}
    assert 0 <= numbers["nested_constraint_met"] <= 1 and per_image["score"].between(0, 1).all()
    report = (folder / "oof_report.md").read_text()
    assert "image-level sensitivity of at least 0.95" in report and "## As a detector" in report
    for plot in ("tradeoff", "detector_curves", "reliability"):
        assert (folder / "plots" / f"{plot}.png").is_file() and f"plots/{plot}.png" in report
    assert (
        json.loads((folder / "oof_report.json").read_text())["nested_constraint_met"]
        == numbers["nested_constraint_met"]
    )
