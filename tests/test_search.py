import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pneumoseg import layout
from pneumoseg.data import rle
from pneumoseg.data.probstore import ProbabilityWriter
from pneumoseg.data.resize import resize_probabilities
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.evaluation.metrics import dice_from_counts, dice_per_image
from pneumoseg.inference.predictor import configured_postprocessor
from pneumoseg.postprocess.search import GRIDS, count_thresholds, evaluate, run_search
from pneumoseg.postprocess.strategies import build_postprocessor, load_postprocessor
from pneumoseg.reports import oof as oof_report
from pneumoseg.stages import search as stage
from synthetic_oof import ArraySource, write_oof_experiment


def _oof(n=48, size=32, original=128, seed=0, specks=0):
    """Random OOF levels (``size`` px) with blurred discs, the discs' truth at the ``original`` size, and a fold
    label per image; up to ``specks`` confident false-positive specks per image make component areas matter."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, original, original), np.uint8)
    levels = np.zeros((n, size, size), np.uint8)
    scale = original // size
    for i in range(n):
        if rng.random() < 0.5:
            centre = tuple(int(c) * scale for c in rng.integers(6, size - 6, 2))
            cv2.circle(truth[i], centre, int(rng.integers(2 * scale, 6 * scale)), 1, -1)
        small = cv2.resize(truth[i].astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        signal = small * rng.uniform(0.2, 1) + rng.random((size, size)) * 0.6
        for row, col in rng.integers(2, size - 4, (rng.integers(0, specks + 1), 2)):
            signal[row : row + 2, col : col + 2] = rng.uniform(0.6, 1.2)
        levels[i] = np.clip(cv2.GaussianBlur(signal.astype(np.float32), (5, 5), 0) * 255, 0, 255).astype(np.uint8)
    return ArraySource(levels, truth.astype(bool)), np.arange(n) % 3


GRID_BLOCKS = [
    {"name": "threshold", "params": {"threshold": [0.1, 0.3, 0.4, 0.5, 0.6, 0.8], "min_area": [0, 2000, 8000]}},
    {
        "name": "triplet",
        "params": {
            "top": [0.3, 0.5, 0.7],
            "min_area": [0, 1000, 5000, 20000],
            "bottom": [0.2, 0.3, 0.4, 0.6],
            "min_component_area": [3000, 10000],
        },
    },
]


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 102 / 255, 0.77, 1.0])
def test_counts_give_the_full_size_area_and_intersection_above_any_threshold(threshold):
    source, _ = _oof()
    thresholds = np.array([0.0, 0.2, 0.5, 102 / 255, 0.77, 1.0], np.float32)
    pred, inter = count_thresholds(source, np.unique(thresholds)).counts([threshold])
    full = np.stack([resize_probabilities(levels / np.float32(255), 128, 128) for levels in source.levels])
    mask = full > np.float32(threshold)
    assert (pred[:, 0] == mask.sum((1, 2))).all()
    assert (inter[:, 0] == (mask & source.truth).sum((1, 2))).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_every_candidate_scores_as_the_straightforward_method(seed):
    source, groups = _oof(seed=seed)
    result = run_search(source, groups, [GRIDS.build(b) for b in GRID_BLOCKS], refine_steps=1)
    strategies = [build_postprocessor(result.block(row)) for row in range(len(result.candidates))]
    pred, inter, true = evaluate(source, strategies)
    dice = dice_from_counts(inter, pred, true[:, None])
    assert np.abs(dice.mean(0) - result.candidates["dice"]).max() < 1e-9
    per_group = np.stack([dice[groups == g].sum(0) for g in range(3)], axis=1)
    assert np.abs(per_group - result.group_sums).max() < 1e-9
    assert set(result.candidates["method"]) == {"histogram", "components"}
    assert result.candidates["dice"].iloc[result.best] == pytest.approx(dice.mean(0).max(), abs=1e-12)


@pytest.mark.parametrize(
    "component_area, expected",
    [
        (9, (1 + 32 / 41) / 2),  # both squares kept
        (10, (32 / 41 + 1) / 2),  # the 9-pixel square dropped
        (16, (32 / 41 + 1) / 2),
        (17, 0.0),  # both dropped
    ],
)
def test_component_areas_at_the_boundary(component_area, expected):
    # Squares of 4x4 = 16 and 3x3 = 9 pixels at 32 px (one pixel here is 1024 pixels of the 1024 px image);
    # image 0's truth is both squares, image 1's the big one only.
    levels = np.zeros((2, 32, 32), np.uint8)
    levels[:, 2:6, 2:6] = levels[:, 20:23, 20:23] = 200
    truth = levels > 0
    truth[1, 20:23, 20:23] = False
    source = ArraySource(levels, truth)
    grid = GRIDS.build({"name": "threshold", "params": {"threshold": [0.5], "min_area": [component_area * 1024]}})
    result = run_search(source, np.zeros(2, int), [grid])
    assert list(result.candidates["method"]) == ["histogram", "components"]
    assert result.candidates["dice"].iloc[1] == pytest.approx(expected, abs=1e-12)
    pred, inter, true = evaluate(source, [build_postprocessor(result.block(1))])
    assert dice_from_counts(inter, pred, true[:, None]).mean() == pytest.approx(expected, abs=1e-12)


def test_triplet_candidates_never_have_bottom_above_top():
    source, groups = _oof()
    result = run_search(source, groups, [GRIDS.build(GRID_BLOCKS[1])])
    triplets = result.candidates
    assert (triplets["bottom"] <= triplets["top"]).all()
    # 3 tops x 4 min_areas x the bottoms not above each top (2, 3, 4) + components around the best.
    assert (triplets["method"] == "histogram").sum() == 4 * (2 + 3 + 4)


def test_components_are_searched_within_refine_steps_of_the_best_bottom():
    source, groups = _oof()
    grid = GRIDS.build(GRID_BLOCKS[0])
    result = run_search(source, groups, [grid], refine_steps=1)
    exact = result.candidates[result.candidates["method"] == "histogram"]
    best = exact["bottom"].iloc[int(exact["dice"].to_numpy().argmax())]
    index = list(grid.bottoms).index(best)
    refined = result.candidates[result.candidates["method"] == "components"]
    assert set(refined["bottom"]) == set(grid.bottoms[max(index - 1, 0) : index + 2])
    assert set(refined["min_component_area"]) == {2000, 8000}


@pytest.mark.parametrize("seed", [1, 5])
def test_nested_estimate_reruns_the_whole_choice_on_the_other_folds(seed):
    # The reference: the search run afresh on the other folds' images alone, its choice applied to the held-out one.
    # With these seeds a held-out fold's best exact threshold differs from the all-fold one, so component areas
    # refined around the all-fold best would give another (optimistic) estimate.
    source, groups = _oof(seed=seed, specks=2)
    grids = [GRIDS.build(b) for b in GRID_BLOCKS]
    nested = run_search(source, groups, grids, refine_steps=1).nested
    for g in range(3):
        train, held = groups != g, groups == g
        alone = run_search(
            ArraySource(source.levels[train], source.truth[train]), groups[train] // 3, grids, refine_steps=1
        )
        assert nested.choices[g] == alone.block(alone.best)
        pred, inter, true = evaluate(
            ArraySource(source.levels[held], source.truth[held]), [build_postprocessor(nested.choices[g])]
        )
        assert nested.scores[g] == pytest.approx(dice_from_counts(inter, pred, true[:, None]).mean(), abs=1e-9)
    assert run_search(source, np.zeros(len(groups), int), grids).nested is None


def test_equal_scores_prefer_the_first_candidate():
    source, groups = _oof(original=32)
    # At the maps' own size p = level / 255: thresholds between two adjacent levels give the same masks, hence
    # exactly tied candidates.
    grid = GRIDS.build({"name": "threshold", "params": {"threshold": [0.5, 0.5005, 0.501]}})
    result = run_search(source, groups, [grid])
    assert result.candidates["dice"].nunique() == 1 and result.best == 0


@pytest.mark.parametrize(
    "block, message",
    [
        ({"name": "threshold", "params": {"threshold": []}}, "needs a list of values"),
        ({"name": "threshold", "params": {"threshold": [0.5, 1.2]}}, r"in \[0.0, 1.0\]"),
        ({"name": "threshold", "params": {"threshold": ["a"]}}, "needs a list of values"),
        ({"name": "triplet", "params": {"top": [0.5], "min_area": [-5], "bottom": [0.3]}}, "triplet.min_area"),
        ({"name": "triplet", "params": {"top": [0.3], "min_area": [0], "bottom": [0.5]}}, "no candidate is left"),
        ({"name": "fancy", "params": {}}, "unknown search grid 'fancy'"),
    ],
)
def test_bad_grids_are_config_errors(block, message):
    with pytest.raises(ConfigError, match=message):
        GRIDS.build(block)


# --- the stage ---------------------------------------------------------------------------------------------------


@pytest.fixture
def experiment(tiny_cfg):
    cfg = tiny_cfg()
    return cfg, write_oof_experiment(cfg, n_images=40, oof_size=32)


def _independent_dice(cfg, data, strategy) -> pd.DataFrame:
    """Per-image Dice recomputed from the stored files alone, as the submission is scored: each OOF map brought
    to the original size with resize_probabilities, post-processed there, and compared with the truth decoded
    from train-rle.csv; without pneumoseg.postprocess.search or the stage."""
    truth_rle = pd.read_csv(Path(cfg.paths.input_dir) / "train-rle.csv", dtype=str).set_index("ImageId")
    sizes = pd.read_csv(data.labels_dir / "labels.csv", dtype={"ImageId": str}).set_index("ImageId")
    rows = []
    for fold in sorted(set(data.folds)):
        oof = data.train_dir / f"fold{fold}" / "oof"
        maps = np.load(oof / "probs.npy")
        for image_id, levels in zip(pd.read_csv(oof / "ids.csv", dtype=str)["ImageId"], maps):
            height, width = sizes.loc[image_id, ["rows", "cols"]]
            truth = rle.decode(truth_rle.loc[image_id, "EncodedPixels"], height, width)
            mask = strategy(resize_probabilities(levels.astype(np.float32) / 255, height, width))
            rows.append(
                {"fold": fold, "positive": truth.any(), "predicted": mask.any(), "dice": dice_per_image(mask, truth)[0]}
            )
    return pd.DataFrame(rows)


def test_stage_report_matches_an_independent_computation(experiment):
    cfg, data = experiment
    numbers = stage.run(cfg)
    folder = layout.search_dir(cfg)
    chosen = load_postprocessor(folder / "thresholds.json")
    mine = _independent_dice(cfg, data, chosen)
    default = _independent_dice(cfg, data, build_postprocessor({"name": "threshold", "params": {"threshold": 0.5}}))

    assert numbers["n_images"] == len(mine) == 40
    assert numbers["oof_score"] == pytest.approx(mine["dice"].mean(), abs=1e-9)
    assert numbers["default_score"] == pytest.approx(default["dice"].mean(), abs=1e-9)
    assert numbers["empty_baseline"] == pytest.approx(1 - mine["positive"].mean())
    assert numbers["positive_dice"] == pytest.approx(mine.loc[mine["positive"], "dice"].mean())
    assert numbers["false_positive_rate"] == pytest.approx(mine.loc[~mine["positive"], "predicted"].mean())
    assert numbers["false_negative_rate"] == pytest.approx(1 - mine.loc[mine["positive"], "predicted"].mean())
    assert [f["score"] for f in numbers["per_fold"]] == pytest.approx(list(mine.groupby("fold")["dice"].mean()))
    assert numbers["oof_score"] >= numbers["default_score"] and numbers["oof_score"] > numbers["empty_baseline"]
    assert 0 < numbers["nested_score"] <= numbers["oof_score"] + 1e-12

    candidates = pd.read_csv(folder / "candidates.csv")
    assert candidates["dice"].iloc[0] == pytest.approx(numbers["oof_score"], abs=1e-12)
    assert {"dice_fold0", "dice_fold1"} <= set(candidates.columns)
    assert json.loads((folder / "oof_report.json").read_text()) == json.loads(json.dumps(numbers))
    report = (folder / "oof_report.md").read_text()
    for plot in ("search", "folds", "training_curves", "gallery"):
        assert (folder / "plots" / f"{plot}.png").is_file() and f"plots/{plot}.png" in report
    assert f"{numbers['oof_score']:.4f}" in report


def test_stage_skips_when_complete_and_reruns_when_inputs_change(experiment):
    cfg, data = experiment
    first = stage.run(cfg)
    report = layout.search_dir(cfg) / "oof_report.json"
    written = report.stat().st_mtime_ns
    assert stage.run(cfg) == first and report.stat().st_mtime_ns == written
    write_oof_experiment(cfg, n_images=40, oof_size=32, seed=1)  # retrained: new OOF stores
    assert stage.run(cfg)["oof_score"] != first["oof_score"]


def test_stage_searches_the_folds_of_train_folds_only(tiny_cfg):
    cfg = tiny_cfg("train.folds=[1]")
    write_oof_experiment(cfg, n_images=12, oof_size=16)
    numbers = stage.run(cfg)
    assert [f["fold"] for f in numbers["per_fold"]] == [1] and numbers["n_images"] == 6
    assert numbers["nested_score"] is None and "nested_score" not in numbers["per_fold"][0]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("[4]", r"train.folds names fold\(s\) \[4\], which .*folds.csv does not have"),
        ("[x]", "train.folds must be 'all' or fold numbers"),
    ],
)
def test_bad_train_folds(tiny_cfg, setting, message):
    cfg = tiny_cfg(f"train.folds={setting}")
    write_oof_experiment(cfg, n_images=8, oof_size=16)
    with pytest.raises(ConfigError, match=message):
        stage.run(cfg)


def test_configured_postprocessor_follows_postprocess_source(experiment, tiny_cfg):
    cfg, _ = experiment
    with pytest.raises(DataError, match="run scripts/04_search_thresholds.py first"):
        configured_postprocessor(cfg)
    stage.run(cfg)
    assert configured_postprocessor(cfg) == load_postprocessor(layout.thresholds_path(cfg))
    own = tiny_cfg("postprocess.source=config", "postprocess.params.threshold=0.3")
    assert configured_postprocessor(own).to_block() == {
        "name": "threshold",
        "params": {"threshold": 0.3, "min_area": 0},
    }
    with pytest.raises(ConfigError, match="postprocess.source must be one of"):
        configured_postprocessor(tiny_cfg("postprocess.source=nowhere"))


def _drop_fold(data):
    for path in (data.train_dir / "fold1" / "oof").iterdir():
        path.unlink()


def _rename_an_image(data):
    folds = pd.read_csv(data.train_dir / "folds.csv", dtype={"ImageId": str})
    folds.loc[0, "ImageId"] = "1.2.3.not.predicted"
    folds.to_csv(data.train_dir / "folds.csv", index=False)


def _empty_store(data):
    folds = pd.read_csv(data.train_dir / "folds.csv", dtype={"ImageId": str})
    folds[folds["fold"] == 0].to_csv(data.train_dir / "folds.csv", index=False)
    with ProbabilityWriter(data.train_dir / "fold0" / "oof", [], 32):
        pass


def _unlabelled_image(data):
    labels = pd.read_csv(data.labels_dir / "labels.csv", dtype={"ImageId": str})
    labels.iloc[1:].to_csv(data.labels_dir / "labels.csv", index=False)


def _no_folds_file(data):
    (data.train_dir / "folds.csv").unlink()


def _folds_file_without_folds(data):
    (data.train_dir / "folds.csv").write_text("ImageId,split\n1.2.3,0\n")


@pytest.mark.parametrize(
    "breaks, message",
    [
        (_drop_fold, r"fold 1 of .*folds.csv has no OOF predictions: .*fold1.oof lacks probs.npy"),
        (
            _rename_an_image,
            r"disagree on ImageIds: 1 missing from the store \(e.g. \['1.2.3.not.predicted'\]\), "
            r"1 not in the fold",
        ),
        (_empty_store, r"the OOF store .*fold0.oof of fold 0 holds no images"),
        (_unlabelled_image, r"1 ImageIds of the OOF store .* are not in .*labels.csv"),
        (_no_folds_file, r"folds.csv not found: no trained models in .*; run scripts/03_train.py first"),
        (
            _folds_file_without_folds,
            r"folds.csv lacks the column\(s\) \['fold'\]; retrain \(scripts/03_train.py --force\)",
        ),
    ],
)
def test_bad_inputs_name_what_is_missing(experiment, breaks, message):
    cfg, data = experiment
    breaks(data)
    with pytest.raises(DataError, match=message):
        stage.run(cfg)


def test_no_grid_to_search_is_a_config_error(tiny_cfg):
    cfg = tiny_cfg("search.grids.threshold=null", "search.grids.triplet=null")
    write_oof_experiment(cfg, n_images=8, oof_size=16)
    with pytest.raises(ConfigError, match="search.grids names no strategy"):
        stage.run(cfg)


def test_report_shows_the_test_score_beside_the_oof_figures_once_stage_05_adds_it(experiment):
    cfg, _ = experiment
    numbers = stage.run(cfg)
    folder = layout.search_dir(cfg)
    assert "n/a: no held-out labels scored" in (folder / "oof_report.md").read_text()
    oof_report.add_test_score(folder, 0.8123, 200)
    report = (folder / "oof_report.md").read_text()
    figures = [
        f"{numbers['oof_score']:.4f}",
        f"{numbers['nested_score']:.4f}",
        f"{numbers['empty_baseline']:.4f}",
        "| held-out test set (200 images, scored by stage 05) | 0.8123 |",
    ]
    assert all(figure in report for figure in figures) and "plots/search.png" in report
    assert json.loads((folder / "oof_report.json").read_text())["test"] == {"score": 0.8123, "n_images": 200}
    assert "maps of 32 px made by torch" in report and "Served runtime" not in report
    check = {
        "images": 200,
        "images_from": "the test set",
        "max_probability_difference": 2e-6,
        "mask_share_differing": 1e-5,
        "dice_between_runtimes": 0.99995,
        "test_score_torch": 0.8123,
        "test_score_onnxruntime": 0.8124,
    }
    oof_report.add_runtime_check(folder, check)  # stage 06: the served runtime against the OOF maps' torch
    report = (folder / "oof_report.md").read_text()
    assert "| Dice between the torch and onnxruntime submissions | 0.999950 |" in report
    assert "| test score through onnxruntime | 0.8124 |" in report and "0.8123 |" in report
    assert json.loads((folder / "oof_report.json").read_text())["served_runtime"]["runtime"] == "onnxruntime"


def test_outline_rule_candidates_score_as_the_straightforward_method():
    # both rules in one search: each grid's components are refined under its own rule
    source, groups = _oof(seed=2, specks=3)
    outline = {
        "name": "triplet",
        "params": {**GRID_BLOCKS[1]["params"], "component_rule": "outline", "min_component_area": [500, 3000, 10000]},
    }
    result = run_search(source, groups, [GRIDS.build(GRID_BLOCKS[1]), GRIDS.build(outline)], refine_steps=1)
    blocks = [result.block(row) for row in range(len(result.candidates))]
    assert sum(b["params"].get("component_rule") == "outline" for b in blocks) > len(blocks) / 2
    pred, inter, true = evaluate(source, [build_postprocessor(b) for b in blocks])
    dice = dice_from_counts(inter, pred, true[:, None])
    assert np.abs(dice.mean(0) - result.candidates["dice"]).max() < 1e-9
