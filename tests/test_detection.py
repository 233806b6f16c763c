"""The detector figures: AUC equal to scikit-learn's, patient-bootstrap intervals that cover, calibration, sizes
and subgroups."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pneumoseg.evaluation.detection import (
    Cases,
    calibration,
    curve_points,
    detector_numbers,
    estimates,
    patient_weights,
    size_groups,
    weighted_auc,
)


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_ap_equal_scikit_learns_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    positive = rng.random(n) < rng.uniform(0.1, 0.6)
    positive[:2] = [True, False]
    # Rounded scores make ties, which count a half.
    score = np.round(np.clip(rng.normal(0.4 + 0.3 * positive, 0.25), 0, 1), int(rng.integers(1, 4)))
    weights = rng.integers(0, 4, size=(3, n)).astype(float)
    weights[:, :2] = 1
    expected = [roc_auc_score(positive, score, sample_weight=w) for w in weights]
    assert weighted_auc(score, positive, weights) == pytest.approx(expected, abs=1e-12)
    curves = curve_points(score, positive)
    assert curves["auc"] == pytest.approx(roc_auc_score(positive, score))
    assert curves["average_precision"] == pytest.approx(average_precision_score(positive, score))


def test_patient_weights_draw_whole_patients():
    patient = np.array([0, 0, 1, 2, 2, 2])
    for weights in patient_weights(patient, 50, seed=3, chunk=16):
        assert weights.shape[1] == 6
        assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
        assert (weights[:, [0, 2, 3]].sum(1) == 3).all()  # three patients drawn per replicate


def _sensitivity_coverage(n_draws: int, n_boot: int) -> float:
    """Share of simulated studies whose 95% interval of the sensitivity holds the true one. Each patient has two
    images with the same outcome (follow-ups of one lung), so resampling images would be too narrow."""
    rng = np.random.default_rng(2024)
    truth, covered = 0.7, 0
    n_patients = 60
    patient = np.repeat(np.arange(n_patients), 2)
    for draw in range(n_draws):
        detected = np.repeat(rng.random(n_patients) < truth, 2)
        cases = Cases(
            positive=np.ones(2 * n_patients, bool),
            detected=detected,
            score=detected * 1.0,
            dice=detected * 1.0,
            patient=patient,
        )
        found = estimates(cases, {}, n_boot, seed=draw)["overall"]["sensitivity"]
        covered += found["low"] <= truth <= found["high"]
    return covered / n_draws


def test_patient_bootstrap_interval_covers_95_percent():
    assert abs(_sensitivity_coverage(400, 400) - 0.95) <= 0.03


def test_calibration_error_of_a_calibrated_and_an_overconfident_score():
    rng = np.random.default_rng(0)
    score = rng.random(20000)
    assert calibration(score, rng.random(20000) < score)["ece"] < 0.02
    assert calibration(np.full(100, 0.9), np.arange(100) < 30)["ece"] == pytest.approx(0.6)


def test_size_bins_in_square_millimetres_where_spacing_is_known():
    frame = pd.DataFrame({"true_area": [0, 100, 3000, 30000], "pixel_spacing": [0.2, 0.2, 0.2, 0.2]})
    groups, unit = size_groups(frame, [0, 2000, 6500, 20000])
    assert unit == "mm²" and list(groups) == ["0-80 mm²", "80-260 mm²", "260-800 mm²", ">800 mm²"]
    assert [g.nonzero()[0].tolist() for g in groups.values()] == [[1], [2], [], [3]]
    frame["pixel_spacing"] = [0.2, np.nan, 0.2, 0.2]
    assert size_groups(frame, [0, 2000])[1] == "px"


def test_subgroup_below_the_overall_figure_is_marked():
    rng = np.random.default_rng(1)
    n = 400
    drain = rng.random(n) < 0.5
    positive = rng.random(n) < 0.5
    # Pneumothoraces without a drain are mostly missed; with one, mostly found.
    detected = np.where(positive, rng.random(n) < np.where(drain, 0.95, 0.3), rng.random(n) < 0.05)
    frame = pd.DataFrame(
        {
            "true_area": positive * 500,
            "pred_area": detected * 1,
            "score": rng.random(n),
            "dice": detected * positive * 0.8,
            "PatientID": [f"p{i // 2}" for i in range(n)],
            "drain": drain.astype(int),
            "sex": "M",
        }
    )
    numbers = detector_numbers(frame, [0, 2000], ["drain"], 200, seed=0)
    rows = {row["group"]: row for row in numbers["subgroups"]}
    assert set(rows) == {"drain=0", "drain=1"}  # sex has one value: no split
    assert "sensitivity" in rows["drain=0"]["below"] and "sensitivity" not in rows["drain=1"]["below"]
    assert numbers["n_patients"] == n // 2


def test_rates_at_the_operating_point_match_the_confusion_matrix():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(7)
    n = 200
    frame = pd.DataFrame(
        {
            "true_area": (rng.random(n) < 0.3) * 900,
            "pred_area": (rng.random(n) < 0.4) * 50,
            "score": rng.random(n),
            "dice": rng.random(n),
        }
    )
    overall = estimates(Cases.from_frame(frame), {}, 0, seed=0)["overall"]
    tn, fp, fn, tp = confusion_matrix(frame["true_area"] > 0, frame["pred_area"] > 0).ravel()
    expected = {
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "ppv": tp / (tp + fp),
        "npv": tn / (tn + fn),
        "dice": frame["dice"].mean(),
        "positive_dice": frame.loc[frame["true_area"] > 0, "dice"].mean(),
    }
    assert {key: overall[key]["value"] for key in expected} == pytest.approx(expected)
    assert overall["auc"]["value"] == pytest.approx(roc_auc_score(frame["true_area"] > 0, frame["score"]))


def test_leaderboard_shows_the_detector_figures(tmp_path):
    import json

    from pneumoseg.evaluation import leaderboard

    run = tmp_path / "exp"
    (run / "04_search").mkdir(parents=True)
    (run / "05_predict").mkdir()
    rate = {"value": 0.8, "low": 0.7, "high": 0.9}
    detection = {"auc": 0.93, "operating_point": {"sensitivity": rate, "specificity": {**rate, "value": 0.95}}}
    (run / "04_search" / "done.json").write_text(json.dumps({"summary": {"oof_score": 0.9, "detection": detection}}))
    (run / "05_predict" / "done.json").write_text(json.dumps({"summary": {"test_score": 0.91, "test_auc": 0.88}}))
    row = leaderboard.read_run(run)
    assert (row.auc, row.sensitivity, row.specificity, row.test_auc) == (0.93, 0.8, 0.95, 0.88)
    assert "| 0.930 | 0.800 | 0.950 | 0.880 |" in leaderboard.markdown([row])
