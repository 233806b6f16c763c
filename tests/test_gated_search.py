"""The classifier gate in post-processing: the ``gated`` strategy and its exact search."""

import numpy as np
import pandas as pd
import pytest

from pneumoseg import layout
from pneumoseg.data.probstore import ProbabilityStore
from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.postprocess.search import GRIDS, evaluate, run_search
from pneumoseg.postprocess.strategies import Gated, build_postprocessor, load_postprocessor
from pneumoseg.stages import search as stage
from synthetic_oof import ArraySource, write_oof_experiment
from test_search import GRID_BLOCKS, _oof

GATE_THRESHOLDS = [0.25, 0.5, 0.75]


def _gates(source, seed, informative=True):
    """Gate probabilities that lean towards the truth, a quarter of them exactly at a gate threshold (float32,
    as stored)."""
    rng = np.random.default_rng(seed)
    positive = source.truth.reshape(len(source), -1).any(1)
    gates = np.clip(rng.normal(0.3 + 0.4 * positive * informative, 0.25), 0, 1)
    at = rng.random(len(gates)) < 0.25
    gates[at] = rng.choice(GATE_THRESHOLDS, at.sum())
    return gates.astype(np.float32)


def test_gated_empties_images_below_the_gate_only():
    probs = np.zeros((8, 8), np.float32)
    probs[2:5, 2:5] = 0.9
    gated = build_postprocessor(
        {"name": "gated", "params": {"gate": 0.5, "inner": {"name": "threshold", "params": {"threshold": 0.5}}}}
    )
    assert gated(probs, np.float32(0.5)).sum() == 9  # at the threshold: kept
    assert gated(probs, 0.4999).sum() == 0
    with pytest.raises(ValueError, match="gate probability"):
        gated(probs)
    assert build_postprocessor(gated.to_block()) == gated
    assert gated.label() == "gated:0.5:threshold:0.5:0"


@pytest.mark.parametrize(
    "block, message",
    [
        ({"gate": 1.5, "inner": {"name": "threshold", "params": {}}}, "probability"),
        (
            {"gate": 0.5, "inner": {"name": "gated", "params": {"gate": 0.2, "inner": {"name": "threshold"}}}},
            "must not be gated",
        ),
    ],
)
def test_bad_gated_blocks_are_config_errors(block, message):
    with pytest.raises(ConfigError, match=message):
        Gated(**block)


@pytest.mark.parametrize("seed, all_empty", [(0, False), (1, False), (2, False), (3, True)])
def test_every_gated_candidate_scores_as_the_straightforward_method(seed, all_empty):
    source, groups = _oof(seed=seed, specks=2)
    if all_empty:
        source = ArraySource(source.levels, np.zeros_like(source.truth))
    gates = _gates(source, seed)
    result = run_search(
        source,
        groups,
        [GRIDS.build(b) for b in GRID_BLOCKS],
        refine_steps=1,
        gates=gates,
        gate_thresholds=GATE_THRESHOLDS,
    )
    gated = result.rows_of(gated=True)
    assert set(result.candidates["gate"].iloc[gated]) == set(GATE_THRESHOLDS)
    assert set(result.candidates["method"].iloc[gated]) == {"histogram", "components"}
    strategies = [build_postprocessor(result.block(row)) for row in range(len(result.candidates))]
    pred, inter, true = evaluate(source, strategies, gates=gates)
    dice = dice_from_counts(inter, pred, true[:, None])
    assert np.abs(dice.mean(0) - result.candidates["dice"]).max() < 1e-9
    per_group = np.stack([dice[groups == g].sum(0) for g in range(3)], axis=1)
    assert np.abs(per_group - result.group_sums).max() < 1e-9


def test_gated_nested_estimate_reruns_the_choice_gate_included():
    source, groups = _oof(seed=5, specks=2)
    gates = _gates(source, 5)
    grids = [GRIDS.build(b) for b in GRID_BLOCKS]
    result = run_search(source, groups, grids, refine_steps=1, gates=gates, gate_thresholds=GATE_THRESHOLDS)
    assert result.block(result.best)["name"] == "gated"  # an informative gate helps on these images
    for g in range(3):
        train, held = groups != g, groups == g
        alone = run_search(
            ArraySource(source.levels[train], source.truth[train]),
            groups[train] // 3,
            grids,
            refine_steps=1,
            gates=gates[train],
            gate_thresholds=GATE_THRESHOLDS,
        )
        assert result.nested.choices[g] == alone.block(alone.best)
        assert result.nested_by_gate["gated"].choices[g] == alone.block(alone.best_of(gated=True))
        assert result.nested_by_gate["ungated"].choices[g] == alone.block(alone.best_of(gated=False))
        pred, inter, true = evaluate(
            ArraySource(source.levels[held], source.truth[held]),
            [build_postprocessor(result.nested.choices[g])],
            gates=gates[held],
        )
        assert result.nested.scores[g] == pytest.approx(dice_from_counts(inter, pred, true[:, None]).mean(), abs=1e-9)
    ungated = run_search(source, groups, grids, refine_steps=1)
    assert result.nested_by_gate["ungated"].score == pytest.approx(ungated.nested.score, abs=1e-12)
    assert result.block(result.best_of(gated=False)) == ungated.block(ungated.best)


def test_gate_thresholds_without_gate_probabilities_are_a_config_error():
    source, groups = _oof()
    with pytest.raises(ConfigError, match="no gate probabilities"):
        run_search(source, groups, [GRIDS.build(GRID_BLOCKS[0])], gate_thresholds=[0.5])


# --- stage 04 on OOF stores with gate probabilities ------------------------------------------------------------------


def test_stage_searches_the_gate_and_reports_the_score_with_and_without_it(tiny_cfg):
    cfg = tiny_cfg("search.gate_thresholds=[0.2, 0.4, 0.6]")
    write_oof_experiment(cfg, n_images=40, oof_size=32, gates=True)
    numbers = stage.run(cfg)
    gate = numbers["gate"]
    assert gate["thresholds"] == [0.2, 0.4, 0.6]
    assert numbers["oof_score"] == pytest.approx(max(gate["ungated"]["oof_score"], gate["gated"]["oof_score"]))
    assert gate["gated"]["nested_score"] is not None and gate["ungated"]["nested_score"] is not None
    folder = layout.search_dir(cfg)
    chosen = load_postprocessor(folder / "thresholds.json")
    per_image = pd.read_csv(folder / "per_image.csv")
    stores = [ProbabilityStore(layout.oof_dir(layout.fold_dir(cfg, fold))) for fold in range(2)]
    np.testing.assert_allclose(per_image["gate"], np.concatenate([s.gates for s in stores]), atol=1e-6)
    assert chosen.to_block() == build_postprocessor(numbers["chosen"]).to_block()
    report = (folder / "oof_report.md").read_text()
    assert "## With and without the gate" in report and "| gated |" in report


def test_stage_refuses_gate_thresholds_without_a_gate(tiny_cfg):
    cfg = tiny_cfg("search.gate_thresholds=[0.5]")
    write_oof_experiment(cfg, n_images=20, oof_size=32)
    with pytest.raises(ConfigError, match="no gate probabilities"):
        stage.run(cfg)
