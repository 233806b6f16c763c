"""The model judged as a detector, image by image: ROC AUC and average precision of the image-level score,
sensitivity, specificity, PPV and NPV at the operating point, calibration, and the same by lesion size and by
subgroup, each with a 95% bootstrap interval that resamples patients (not images).

The input is one row per image (:class:`Cases`): the truth (the image has a pneumothorax), the decision at the
operating point (the post-processed mask is non-empty), the image-level score (the probability the strategy
decides on, :meth:`pneumoseg.postprocess.strategies.PostProcessor.score`), the image's Dice and its patient.
Images of one patient are correlated (follow-ups of one lung), so an interval that resamples images is too
narrow; :func:`patient_weights` draws whole patients with replacement and gives each image its patient's count.
Every figure is a weighted statistic (:func:`statistics`), so the point estimate (all weights 1) and each
bootstrap replicate come from the same code; an interval is the 2.5th and 97.5th percentiles of the replicates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

LEVEL = 0.95
CALIBRATION_BINS = 10
AGE_BANDS = (0, 30, 50, 70, 200)  # years: <30, 30-49, 50-69, >=70
# Bootstrap replicates are weighed this many at a time: B x N float64 arrays stay a few MB at 12,000 images.
CHUNK = 64
RATES = ("sensitivity", "specificity", "ppv", "npv")
GROUP_FIGURES = ("auc", "sensitivity", "specificity", "dice", "positive_dice")


@dataclass(frozen=True)
class Cases:
    """One row per image.

    Attributes:
        positive: the truth has a pneumothorax.
        detected: the post-processed mask is non-empty (the decision at the operating point).
        score: the image-level probability, in [0, 1].
        dice: the image's Dice under the chosen post-processing.
        patient: an integer code per patient (images of one patient share it).
    """

    positive: np.ndarray
    detected: np.ndarray
    score: np.ndarray
    dice: np.ndarray
    patient: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Cases:
        """From a frame with ``true_area, pred_area, score, dice`` and optionally ``PatientID`` (an image
        without one is a patient of its own)."""
        if "PatientID" in frame.columns:
            patient = frame["PatientID"].astype("string").fillna("").str.strip()
            patient = patient.where(
                patient != "", "image " + pd.Series(range(len(frame)), index=frame.index).astype(str)
            )
        else:
            patient = pd.Series(np.arange(len(frame)), index=frame.index)
        return cls(
            positive=frame["true_area"].to_numpy() > 0,
            detected=frame["pred_area"].to_numpy() > 0,
            score=frame["score"].to_numpy(np.float64),
            dice=frame["dice"].to_numpy(np.float64),
            patient=pd.factorize(patient)[0],
        )

    def __len__(self) -> int:
        return len(self.positive)


def patient_weights(patient: np.ndarray, n_boot: int, seed: int, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Bootstrap weights that resample patients: chunks of (at most ``chunk``) x N image weights, ``n_boot`` rows
    in all; row ``b`` gives each image the number of times its patient was drawn in replicate ``b``.

    Args:
        patient: N integer patient codes 0..P-1.
        n_boot: replicates.
        seed: the random stream's seed (the same seed gives the same replicates).
        chunk: replicates per yielded array.
    """
    rng = np.random.default_rng(seed)
    n_patients = int(patient.max()) + 1 if len(patient) else 0
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        draws = rng.integers(0, n_patients, size=(rows, n_patients)) + n_patients * np.arange(rows)[:, None]
        counts = np.bincount(draws.ravel(), minlength=rows * n_patients).reshape(rows, n_patients)
        yield counts[:, patient].astype(np.float64)


def weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The ROC AUC of ``score`` for ``positive`` under each row of ``weights`` (B x N): the weighted share of
    (positive, negative) pairs ranked right, ties counting a half (scikit-learn's with ``sample_weight``).
    NaN for a row without weight on both classes (every row, when the images hold one class only)."""
    if positive.all() or not positive.any():
        return np.full(len(weights), np.nan)
    negatives = np.flatnonzero(~positive)
    negatives = negatives[np.argsort(score[negatives], kind="stable")]
    ranked = score[negatives]
    positives = np.flatnonzero(positive)
    # Each positive's place among the sorted negatives: those strictly below it, and below or tied with it.
    below = np.searchsorted(ranked, score[positives], side="left")
    tied_or_below = np.searchsorted(ranked, score[positives], side="right")
    negative_weights = weights[:, negatives]
    cumulative = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(negative_weights, axis=1)], axis=1)
    credit = 0.5 * (cumulative[:, below] + cumulative[:, tied_or_below])  # below + half the ties
    positive_weights = weights[:, positives]
    pairs = positive_weights.sum(1) * negative_weights.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (positive_weights * credit).sum(1) / pairs, np.nan)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def statistics(cases: Cases, weights: np.ndarray, with_auc: bool = True) -> dict[str, np.ndarray]:
    """Every figure of :data:`GROUP_FIGURES` and :data:`RATES` under each row of ``weights`` (B x N); NaN where
    undefined (no positive image for the sensitivity, say)."""
    pos, det = cases.positive.astype(np.float64), cases.detected.astype(np.float64)
    tp, fn = weights @ (pos * det), weights @ (pos * (1 - det))
    fp, tn = weights @ ((1 - pos) * det), weights @ ((1 - pos) * (1 - det))
    figures = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "dice": _ratio(weights @ cases.dice, weights.sum(1)),
        "positive_dice": _ratio(weights @ (cases.dice * pos), tp + fn),
    }
    if with_auc:
        figures["auc"] = weighted_auc(cases.score, cases.positive, weights)
    return figures


def subset(cases: Cases, rows: np.ndarray) -> Cases:
    """The cases of the boolean ``rows``."""
    return Cases(cases.positive[rows], cases.detected[rows], cases.score[rows], cases.dice[rows], cases.patient[rows])


def _value(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def estimates(cases: Cases, groups: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Point estimates and 95% patient-bootstrap intervals of every figure, overall and per group.

    Args:
        cases: every image.
        groups: name -> boolean rows of the images of that group (``overall`` is added: every image).
        n_boot: bootstrap replicates (0: no intervals).
        seed: the bootstrap's seed; every group sees the same replicates.

    Returns:
        name -> figure -> ``{"value", "low", "high"}`` (None where undefined), with ``n_images`` and ``n_positive``.
    """
    groups = {"overall": np.ones(len(cases), bool), **groups}
    parts = {name: subset(cases, rows) for name, rows in groups.items()}
    points = {name: statistics(part, np.ones((1, len(part)))) for name, part in parts.items()}
    draws: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in groups}
    for weights in patient_weights(cases.patient, n_boot, seed):
        for name, rows in groups.items():
            for key, values in statistics(parts[name], weights[:, rows]).items():
                draws[name].setdefault(key, []).append(values)
    tail = 100 * (1 - LEVEL) / 2
    out = {}
    for name, part in parts.items():
        entry: dict[str, Any] = {"n_images": len(part), "n_positive": int(part.positive.sum())}
        for key, point in points[name].items():
            values = np.concatenate(draws[name][key]) if draws[name] else np.empty(0)
            values = values[np.isfinite(values)]
            low, high = np.percentile(values, [tail, 100 - tail]) if values.size else (np.nan, np.nan)
            entry[key] = {"value": _value(point[0]), "low": _value(low), "high": _value(high)}
        out[name] = entry
    return out


def calibration(score: np.ndarray, positive: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """The reliability table of the image-level probability (``n_bins`` equal-width bins of the score) and its
    expected calibration error: the image-weighted mean of |share positive - mean score| over the bins."""
    bins = np.clip((score * n_bins).astype(int), 0, n_bins - 1)
    table = []
    ece = 0.0
    for b in range(n_bins):
        rows = bins == b
        if rows.any():
            confidence, observed = float(score[rows].mean()), float(positive[rows].mean())
            ece += rows.sum() / len(score) * abs(observed - confidence)
            table.append(
                {
                    "low": b / n_bins,
                    "high": (b + 1) / n_bins,
                    "n_images": int(rows.sum()),
                    "mean_score": confidence,
                    "share_positive": observed,
                }
            )
    return {"ece": float(ece), "bins": table}


def curve_points(score: np.ndarray, positive: np.ndarray) -> dict[str, Any] | None:
    """ROC AUC and average precision (scikit-learn) and both curves; None with a single class."""
    if positive.all() or not positive.any():
        return None
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(positive, score)
    precision, recall, _ = precision_recall_curve(positive, score)
    return {
        "auc": float(roc_auc_score(positive, score)),
        "average_precision": float(average_precision_score(positive, score)),
        "roc": (fpr, tpr),
        "pr": (recall, precision),
    }


def size_groups(frame: pd.DataFrame, edges: Sequence[int]) -> tuple[dict[str, np.ndarray], str]:
    """The positive images by lesion size, in the data report's bins (``folds.area_bins``, original pixels).

    Where every positive image has a pixel spacing (``pixel_spacing`` in mm), areas and bin edges are in mm²: the
    edges converted with the median spacing, each lesion with its own. Returns bin name -> rows, and the unit.
    """
    positive = frame["true_area"].to_numpy() > 0
    area = frame["true_area"].to_numpy(np.float64)
    bounds = np.asarray(edges, np.float64)
    unit = "px"
    column = frame.get("pixel_spacing", pd.Series(np.nan, index=frame.index))
    spacing = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
    if positive.any() and np.isfinite(spacing[positive]).all() and (spacing[positive] > 0).all():
        area = area * spacing**2
        bounds = np.round(bounds * np.median(spacing[positive]) ** 2)
        unit = "mm²"
    index = np.searchsorted(bounds, area, side="left")
    names = [f"{low:g}-{high:g} {unit}" for low, high in pairwise(bounds)] + [f">{bounds[-1]:g} {unit}"]
    return {name: positive & (index == k + 1) for k, name in enumerate(names)}, unit


def age_band(age: pd.Series) -> pd.Series:
    """Age bands of :data:`AGE_BANDS` as text ("30-49"), "" where unknown."""
    years = pd.to_numeric(age, errors="coerce")
    labels = [f"{low}-{high - 1}" if high < 200 else f">={low}" for low, high in pairwise(AGE_BANDS)]
    banded = pd.cut(years, list(AGE_BANDS), right=False, labels=labels)
    return banded.astype("string").fillna("")


def subgroup_columns(frame: pd.DataFrame, extra: Sequence[str]) -> dict[str, np.ndarray]:
    """``column=value`` -> rows, for sex, age band, view and each ``extra`` column of ``frame`` that exists;
    unknown values ("") and columns with a single value are left out."""
    values = {
        "sex": frame.get("sex"),
        "age": age_band(frame["age"]) if "age" in frame else None,
        "view": frame.get("view"),
    }
    values.update({column: frame.get(column) for column in extra})
    groups = {}
    for column, series in values.items():
        if series is None:
            continue
        text = series.astype("string").fillna("").str.strip()
        text = text.str.replace(r"\.0$", "", regex=True)  # 0/1 flags read back as floats
        kinds = sorted(v for v in text.unique() if v != "")
        if len(kinds) < 2:
            continue
        groups.update({f"{column}={kind}": (text == kind).to_numpy() for kind in kinds})
    return groups


def below_overall(entry: dict[str, Any], overall: dict[str, Any], key: str) -> bool:
    """True when the group's interval for ``key`` lies wholly below the overall figure."""
    high, value = entry[key]["high"], overall[key]["value"]
    return high is not None and value is not None and high < value


def detector_numbers(
    frame: pd.DataFrame, area_edges: Sequence[int], extra: Sequence[str], n_boot: int, seed: int
) -> dict[str, Any]:
    """Every figure of the detector report, JSON-ready.

    Args:
        frame: one row per image: ``true_area`` (original pixels), ``pred_area``, ``score``, ``dice``, and where
            known ``PatientID``, ``pixel_spacing``, ``sex``, ``age``, ``view`` and the ``extra`` columns.
        area_edges: the data report's bins (``folds.area_bins``).
        extra: more metadata columns to split by (``report.subgroups``).
        n_boot, seed: as in :func:`estimates`.

    Returns:
        ``auc``, ``average_precision`` (None with a single class), ``operating_point`` (the rates with intervals),
        ``overall`` (every figure), ``calibration``, ``size_unit``, ``by_size`` and ``subgroups`` (lists of
        ``{"group", ...figures, "below": [figures whose interval lies below the overall one]}``).
    """
    cases = Cases.from_frame(frame)
    sizes, unit = size_groups(frame, area_edges)
    subgroups = subgroup_columns(frame, extra)
    found = estimates(cases, {**sizes, **subgroups}, n_boot, seed)
    overall = found.pop("overall")
    curves = curve_points(cases.score, cases.positive)

    def rows(names) -> list[dict[str, Any]]:
        return [
            {
                "group": name,
                **found[name],
                "below": [key for key in GROUP_FIGURES if below_overall(found[name], overall, key)],
            }
            for name in names
        ]

    return {
        "n_images": len(cases),
        "n_positive": int(cases.positive.sum()),
        "n_patients": int(cases.patient.max()) + 1 if len(cases) else 0,
        "n_boot": int(n_boot),
        "auc": None if curves is None else curves["auc"],
        "average_precision": None if curves is None else curves["average_precision"],
        "operating_point": {key: overall[key] for key in RATES},
        "overall": overall,
        "calibration": calibration(cases.score, cases.positive),
        "size_unit": unit,
        "by_size": rows(sizes),
        "subgroups": rows(subgroups),
    }
