"""The detector section of the OOF report (stage 04) and of the test report (stage 05): the figures of
:mod:`pneumoseg.evaluation.detection` as tables, the ROC and precision-recall curves with the operating point
marked, and the reliability diagram.

The per-image table of either stage is joined with stage 01's ``metadata.csv`` (PatientID for the bootstrap,
sex, age, view and pixel spacing) and with ``report.extra_metadata`` (a CSV of ImageId and more columns, such as
the demo's ``drain``), so any of those columns can split the subgroup table (``report.subgroups``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pneumoseg.errors import DataError
from pneumoseg.evaluation.detection import GROUP_FIGURES, RATES, curve_points
from pneumoseg.reports.figures import save_figure

log = logging.getLogger(__name__)

FIGURE_DPI = 110
PLOT_FILES = {"curves": "detector_curves.png", "calibration": "reliability.png"}
METADATA_COLUMNS = ("ImageId", "PatientID", "sex", "age", "view", "pixel_spacing")
NAMES = {
    "auc": "AUC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "dice": "dice",
    "positive_dice": "dice on positives",
}


def with_metadata(per_image: pd.DataFrame, metadata_csv: Path | None, extra_csv: Path | None) -> pd.DataFrame:
    """``per_image`` (with ImageId) joined with stage 01's metadata and the extra annotations, where they exist.

    Raises:
        DataError: ``extra_csv`` lacks an ImageId column (a missing one is a warning: the report goes without it).
    """
    frame = per_image.copy()
    if metadata_csv is not None and metadata_csv.is_file():
        metadata = pd.read_csv(metadata_csv, dtype={"ImageId": str, "PatientID": str})
        kept = [c for c in METADATA_COLUMNS if c in metadata.columns]
        frame = frame.merge(metadata[kept].drop_duplicates("ImageId"), on="ImageId", how="left")
    else:
        log.info(
            "no metadata.csv at %s: the detector report resamples images, not patients, and has no subgroups",
            metadata_csv,
        )
    if extra_csv is not None and not extra_csv.is_file():
        log.warning(
            "report.extra_metadata names %s, which does not exist: the detector report goes without its "
            "columns (fix the path, or set report.extra_metadata=null)",
            extra_csv,
        )
    elif extra_csv is not None:
        extra = pd.read_csv(extra_csv, dtype={"ImageId": str})
        if "ImageId" not in extra.columns:
            raise DataError(f"{extra_csv} (report.extra_metadata) has no ImageId column")
        extra = extra.drop(columns=[c for c in extra.columns if c in frame.columns and c != "ImageId"])
        frame = frame.merge(extra.drop_duplicates("ImageId"), on="ImageId", how="left")
    return frame


def plot_curves(frame: pd.DataFrame, numbers: dict[str, Any], path: Path) -> Path | None:
    """ROC (left) and precision-recall (right) curves of the image-level score, the operating point marked;
    None with a single class."""
    positive = frame["true_area"].to_numpy() > 0
    curves = curve_points(frame["score"].to_numpy(np.float64), positive)
    if curves is None:
        return None
    point = numbers["operating_point"]
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    roc_ax.plot(*curves["roc"], label=f"AUC {curves['auc']:.3f}")
    roc_ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    pr_ax.plot(*curves["pr"], label=f"AP {curves['average_precision']:.3f}")
    pr_ax.axhline(positive.mean(), color="grey", ls=":", lw=0.8, label="prevalence")
    sens, spec, ppv = (point[k]["value"] for k in ("sensitivity", "specificity", "ppv"))
    if sens is not None and spec is not None:
        roc_ax.plot(1 - spec, sens, marker="*", ms=14, color="red", ls="", label="operating point")
    if sens is not None and ppv is not None:
        pr_ax.plot(sens, ppv, marker="*", ms=14, color="red", ls="", label="operating point")
    roc_ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title="ROC of the image-level score",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    pr_ax.set(
        xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02)
    )
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=8, loc="lower right" if ax is roc_ax else "lower left")
    return save_figure(fig, path, FIGURE_DPI)


def plot_reliability(numbers: dict[str, Any], path: Path) -> Path:
    """The reliability diagram: share of positive images against the mean score, per score bin."""
    bins = numbers["calibration"]["bins"]
    fig = Figure(figsize=(4.8, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8, label="calibrated")
    ax.plot([b["mean_score"] for b in bins], [b["share_positive"] for b in bins], marker="o", label="image score")
    for b in bins:
        ax.annotate(
            f"{b['n_images']}",
            (b["mean_score"], b["share_positive"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(3, 3),
        )
    ax.set(
        xlabel="mean image-level score in the bin",
        ylabel="share of images with pneumothorax",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"reliability (ECE {numbers['calibration']['ece']:.3f})",
    )
    ax.legend(fontsize=8)
    return save_figure(fig, path, FIGURE_DPI)


def write_plots(folder: Path, frame: pd.DataFrame, numbers: dict[str, Any]) -> dict[str, Path | None]:
    """Both figures into ``folder``; returns their paths (None for one not drawn)."""
    return {
        "curves": plot_curves(frame, numbers, folder / PLOT_FILES["curves"]),
        "calibration": plot_reliability(numbers, folder / PLOT_FILES["calibration"]),
    }


def interval_text(figure: dict[str, Any] | None) -> str:
    """``value [low, high]`` of one figure of :func:`pneumoseg.evaluation.detection.estimates`."""
    if figure is None or figure["value"] is None:
        return "n/a"
    if figure["low"] is None:
        return f"{figure['value']:.3f}"
    return f"{figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"


def _group_table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
    header = "| group | images | positive | " + " | ".join(NAMES[k] for k in keys) + " |"
    lines = [header, "| --- | ---: | ---: | " + " | ".join("---" for _ in keys) + " |"]
    for row in rows:
        cells = [interval_text(row[k]) + (" **↓**" if k in row["below"] else "") for k in keys]
        lines.append(f"| {row['group']} | {row['n_images']} | {row['n_positive']} | " + " | ".join(cells) + " |")
    return lines


def markdown_lines(numbers: dict[str, Any] | None, plots: Mapping[str, Path | None], link: str) -> list[str]:
    """The report's section "As a detector" (none when ``numbers`` is None); ``link``: the plots' folder relative
    to the report."""
    if numbers is None:
        return []
    point = numbers["operating_point"]
    auc, ap = numbers["auc"], numbers["average_precision"]
    lines = [
        "## As a detector",
        "",
        f"Image by image: an image is called positive when its post-processed mask is non-empty (the operating "
        f"point); the image-level score is the probability the strategy decides on. {numbers['n_images']} images "
        f"({numbers['n_positive']} positive) of {numbers['n_patients']} patients; intervals: 95% bootstrap over "
        f"patients ({numbers['n_boot']} resamples), not images.",
        "",
        "| measure | value [95% interval] |",
        "| --- | ---: |",
        f"| ROC AUC of the image-level score | {interval_text(numbers['overall']['auc'])} |",
        f"| average precision | {'n/a' if ap is None else f'{ap:.3f}'} |",
        *(f"| {NAMES[key]} at the operating point | {interval_text(point[key])} |" for key in RATES),
        f"| expected calibration error ({len(numbers['calibration']['bins'])} filled bins) | "
        f"{numbers['calibration']['ece']:.3f} |",
        "",
    ]
    curves, reliability = plots.get("curves"), plots.get("calibration")
    if auc is not None and curves is not None:
        lines += [f"![ROC and precision-recall curves]({link}/{curves.name})", ""]
    if reliability is not None:
        lines += [f"![reliability diagram]({link}/{reliability.name})", ""]
    lines += [
        f"### By lesion size ({numbers['size_unit']}, the data report's bins)",
        "",
        *_group_table(numbers["by_size"], ("sensitivity", "positive_dice")),
        "",
    ]
    if numbers["subgroups"]:
        lines += [
            "### Subgroups",
            "",
            "**↓**: the group's interval lies wholly below the overall figure.",
            "",
            *_group_table(
                [{"group": "overall", **numbers["overall"], "below": []}] + numbers["subgroups"], GROUP_FIGURES
            ),
            "",
        ]
    else:
        lines += ["No subgroup: no metadata column with two or more known values.", ""]
    return lines
