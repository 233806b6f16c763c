"""The data report of stage 02: ``data_report.md`` with its figures in ``report/``, beside the stage's CSVs.

Like the original demo's data exploration, it shows the share of images with pneumothorax, instances per
image, the distribution of mask areas, where masks lie (the mean mask), the balance of the folds, how many
patients have several images and whether any patient straddles two folds, the positive rate by sex, view and
age when stage 01 found those tags, and a gallery of training images with their masks outlined. Everything is
read back from the files stage 02 and stage 01 wrote, so the report shows exactly what later stages will see.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from pneumoseg import layout
from pneumoseg.data import folds as fold_split
from pneumoseg.data import labels as lb
from pneumoseg.io import read_png, write_png, write_text
from pneumoseg.reports.figures import draw_outline, save_figure
from pneumoseg.stage_table import command

log = logging.getLogger(__name__)

REPORT_FILE = "data_report.md"
FIGURE_FOLDER = "report"
FIGURE_DPI = 100
GALLERY_POSITIVE = 8
GALLERY_NEGATIVE = 4
GALLERY_COLUMNS = 4
GALLERY_MIN_SIZE = 256  # the smallest prepared size at least this large shows the gallery
MEAN_IMAGE_SAMPLE = 400  # images averaged for the mean X-ray behind the mean mask
OUTLINE_RGB = (255, 40, 40)
NUMBER_RGB = (255, 230, 0)
POSITIVE_COLOUR, NEGATIVE_COLOUR = "#d62728", "#1f77b4"
DEMOGRAPHICS = {"sex": "sex", "view": "view position"}
PATIENT = "PatientID"
AGE_RANGE = (0, 100)  # a few real files claim ages over 100 (typos); they are left out of the plot


def write_report(prepared: layout.Where, sizes: list[int], area_edges, seed: int) -> Path:
    """Write ``data_report.md`` and its figures into stage 02's folder, from the outputs of stages 01 and 02.

    Args:
        prepared: the config or ``paths.prepared_dir``, holding both stages' folders (see :mod:`pneumoseg.layout`).
        sizes: the prepared sizes; the smallest gives the mean mask, the smallest of at least 256 the gallery.
        area_edges: ``folds.area_bins``.
        seed: picks the sampled images, so the report is the same on every run.

    Returns:
        The report's path.
    """
    folder = layout.labels_dir(prepared)
    figures = folder / FIGURE_FOLDER
    ids = {lb.ID_COLUMN: str}
    table = pd.read_csv(layout.labels_path(prepared), dtype=ids)
    folds = pd.read_csv(layout.folds_path(prepared), dtype=ids)
    metadata = pd.read_csv(layout.metadata_path(prepared), dtype={**ids, PATIENT: str})
    edges = fold_split.check_area_edges(area_edges)
    rng = np.random.default_rng(seed)
    sections = [
        f"# Data report\n\nWritten by stage 02 (`{command('02')}`) from the files in this folder.",
        _overview(
            table, len(pd.read_csv(layout.test_images_path(prepared))), pd.read_csv(layout.unmatched_path(prepared))
        ),
        _positives_and_instances(table, figures),
        _area_histogram(table, edges, figures),
        _mean_mask(table, prepared, min(sizes), rng, figures),
        _fold_balance(folds, table, edges, figures),
        _patients(folds, metadata),
        _demographics(table, metadata, figures),
        _gallery(table, prepared, _gallery_size(sizes), rng, figures),
    ]
    path = folder / REPORT_FILE
    write_text(path, "\n\n".join(section for section in sections if section) + "\n")
    log.info("data report: %s", path)
    return path


def _overview(table: pd.DataFrame, n_test: int, unmatched: pd.DataFrame) -> str:
    n_positive = int(table["has_mask"].sum())
    rows = [
        ("training images", len(table)),
        ("with pneumothorax", f"{n_positive} ({n_positive / max(len(table), 1):.1%})"),
        ("pneumothorax instances", int(table["n_instances"].sum())),
        ("test images", n_test),
    ]
    rows += [(f"unmatched: {reason}", count) for reason, count in unmatched["reason"].value_counts().items()]
    return "## Overview\n\n" + _markdown_table(pd.DataFrame(rows, columns=["", "count"]))


def _positives_and_instances(table: pd.DataFrame, figures: Path) -> str:
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    share, instances = fig.subplots(1, 2, width_ratios=[1, 2])
    counts = [int((~table["has_mask"]).sum()), int(table["has_mask"].sum())]
    share.bar(["no", "yes"], counts, color=[NEGATIVE_COLOUR, POSITIVE_COLOUR])
    for x, count in enumerate(counts):
        share.annotate(f"{count / max(sum(counts), 1):.1%}", (x, count), ha="center", va="bottom")
    share.set_ylabel("images")
    share.margins(y=0.15)
    share.set_title("pneumothorax?")
    per_image = table.loc[table["has_mask"], "n_instances"].value_counts().sort_index()
    instances.bar(per_image.index, per_image.to_numpy(), color=POSITIVE_COLOUR)
    instances.set_yscale("log")
    instances.set_xticks(per_image.index)
    instances.set_xlabel("instances (label rows) per positive image")
    instances.set_ylabel("images (log scale)")
    instances.set_title("instances per image")
    name = _link(save_figure(fig, figures / "positives.png", FIGURE_DPI))
    several = int((table["n_instances"] > 1).sum())
    return (
        f"## Positive images and instances\n\n![positive share and instances per image]({name})\n\n"
        f"{several} images have more than one instance; their mask is the union of the instances."
    )


def _area_histogram(table: pd.DataFrame, edges: list[int], figures: Path) -> str:
    areas = table.loc[table["has_mask"], "mask_area"].to_numpy()
    if not areas.size:
        return "## Mask areas\n\nNo training image has a mask."
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.subplots()
    bins = np.logspace(np.log10(areas.min()) - 0.05, np.log10(areas.max()) + 0.05, 40)
    ax.hist(areas, bins=bins.tolist(), color=POSITIVE_COLOUR, alpha=0.8)
    ax.set_xscale("log")
    for edge in edges[1:]:
        ax.axvline(edge, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("mask area (original pixels, log scale); dashed: folds.area_bins edges")
    ax.set_ylabel("positive images")
    ax.set_title("mask area")
    name = _link(save_figure(fig, figures / "mask_area.png", FIGURE_DPI))
    quartiles = np.percentile(areas, [0, 25, 50, 75, 100]).astype(int)
    return (
        f"## Mask areas\n\n![mask area histogram]({name})\n\nArea of the union mask in original pixels: "
        f"min {quartiles[0]}, quartiles {quartiles[1]} / {quartiles[2]} / {quartiles[3]}, max {quartiles[4]}."
    )


def _mean_mask(table: pd.DataFrame, prepared: layout.Where, size: int, rng: np.random.Generator, figures: Path) -> str:
    positive = table.loc[table["has_mask"], lb.ID_COLUMN].tolist()
    if not positive:
        return ""
    heat = _mean(layout.masks_dir(prepared, size), positive) / 255.0
    sample = rng.choice(table[lb.ID_COLUMN].to_numpy(), size=min(MEAN_IMAGE_SAMPLE, len(table)), replace=False)
    mean_image = _mean(layout.images_dir(prepared, size), sample)
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    image_ax, heat_ax = fig.subplots(1, 2)
    image_ax.imshow(mean_image, cmap="gray")
    image_ax.set_title(f"mean image ({len(sample)} training images)")
    shown = heat_ax.imshow(heat, cmap="inferno", vmin=0)
    heat_ax.set_title(f"mean mask ({len(positive)} positive images)")
    fig.colorbar(shown, ax=heat_ax, fraction=0.046, label="share of positive images")
    for ax in (image_ax, heat_ax):
        ax.set_axis_off()
    name = _link(save_figure(fig, figures / "mean_mask.png", FIGURE_DPI))
    return (
        f"## Where masks lie\n\n![mean image and mean mask]({name})\n\nThe mean of the {size}x{size} "
        f"masks of the positive images: the share of them covering each pixel (the image's left is the "
        f"patient's right)."
    )


def _mean(image_dir: Path, image_ids) -> np.ndarray:
    total = np.zeros((), np.float64)
    for image_id in image_ids:
        total = total + read_png(image_dir / f"{image_id}.png").astype(np.float64)
    return total / len(image_ids)


def _fold_balance(folds: pd.DataFrame, table: pd.DataFrame, edges: list[int], figures: Path) -> str:
    areas = folds[lb.ID_COLUMN].map(table.set_index(lb.ID_COLUMN)["mask_area"])
    balance = fold_split.fold_balance(folds, areas, edges)
    positive_bins = fold_split.bin_names(edges)[1:]
    per_fold = balance[balance["fold"] != "all"]
    labels = [f"fold {fold}" for fold in per_fold["fold"]]
    fig = Figure(figsize=(9, 0.45 * len(per_fold) + 1.8), layout="constrained")
    rate_ax, mix_ax = fig.subplots(1, 2, sharey=True)
    rate_ax.barh(labels, per_fold["positive_rate"], color=POSITIVE_COLOUR)
    for y, rate in enumerate(per_fold["positive_rate"]):
        rate_ax.annotate(f" {rate:.3f}", (rate, y), va="center", fontsize=8)
    rate_ax.invert_yaxis()
    rate_ax.set_xlabel("share of images with pneumothorax")
    rate_ax.set_title("positive rate")
    shares = per_fold[positive_bins].to_numpy(dtype=float) / np.maximum(per_fold[["positive"]].to_numpy(), 1)
    left = np.zeros(len(per_fold))
    for column, (name, colour) in enumerate(zip(positive_bins, _reds(len(positive_bins)))):
        mix_ax.barh(labels, shares[:, column], left=left, color=colour, label=name)
        left += shares[:, column]
    mix_ax.set_xlim(0, 1)
    mix_ax.set_xlabel("share of the fold's positive images")
    mix_ax.set_title("mask area (original pixels)")
    mix_ax.legend(
        ncol=len(positive_bins),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        frameon=False,
        fontsize=8,
        handlelength=1,
    )
    name = _link(save_figure(fig, figures / "fold_balance.png", FIGURE_DPI))
    grouped = " Groups (`group` in folds.csv) never span two folds." if "group" in folds.columns else ""
    return (
        f"## Folds\n\n![fold balance]({name})\n\nImages per fold and per mask-area bin; median_area is "
        f"over the fold's positive images.{grouped}\n\n" + _markdown_table(balance)
    )


def patient_counts(folds: pd.DataFrame, metadata: pd.DataFrame) -> dict | None:
    """How the training images of ``folds`` fall to patients (``PatientID`` of ``metadata``) and folds.

    Returns:
        None when ``metadata`` has no PatientID; otherwise ``patients`` (an image without a PatientID counts as
        its own patient), ``repeated`` (patients with several images), ``repeated_images`` (their images),
        ``most_images`` (the most images of one patient) and ``straddling`` (patients in more than one fold).
    """
    if PATIENT not in metadata.columns:
        return None
    patient = folds[lb.ID_COLUMN].map(metadata.set_index(lb.ID_COLUMN)[PATIENT])
    patient = _text(patient).where(lambda p: p != "", "image " + folds[lb.ID_COLUMN])
    per_patient = folds.groupby(patient.to_numpy())["fold"].agg(["size", "nunique"])
    repeated = per_patient["size"] > 1
    return {
        "patients": len(per_patient),
        "repeated": int(repeated.sum()),
        "repeated_images": int(per_patient.loc[repeated, "size"].sum()),
        "most_images": int(per_patient["size"].max()) if len(per_patient) else 0,
        "straddling": int((per_patient["nunique"] > 1).sum()),
    }


def _patients(folds: pd.DataFrame, metadata: pd.DataFrame) -> str:
    counts = patient_counts(folds, metadata)
    if counts is None:
        return (
            "## Patients and folds\n\nmetadata.csv has no PatientID (an older stage 01 wrote it): rerun "
            "stage 01 with `--force` to see how images fall to patients."
        )
    text = (
        f"## Patients and folds\n\n{len(folds)} training images of {counts['patients']} patients; "
        f"{counts['repeated']} patients have several images ({counts['repeated_images']} images, at most "
        f"{counts['most_images']} of one patient). "
    )
    if counts["straddling"] == 0:
        return text + "No patient has images in two folds."
    return text + (
        f"**{counts['straddling']} patients have images in more than one fold**, so a fold is scored "
        f"on patients it also trained on and the OOF score flatters: set `folds.group_by: PatientID`."
    )


def _reds(n: int) -> list[tuple[float, ...]]:
    """``n`` shades of red from light to dark, one per non-empty area bin."""
    return [colormaps["Reds"](0.35 + 0.6 * i / max(n - 1, 1)) for i in range(n)]


def _demographics(table: pd.DataFrame, metadata: pd.DataFrame, figures: Path) -> str:
    frame = table.merge(metadata, on=lb.ID_COLUMN, how="left", suffixes=("", "_meta"))
    columns = [c for c in DEMOGRAPHICS if c in frame.columns and _text(frame[c]).str.len().any()]
    has_age = "age" in frame.columns and frame["age"].notna().any()
    if not columns and not has_age:
        return "## Patients\n\nstage 01 found no sex, age or view tags."
    fig = Figure(figsize=(3.2 * (len(columns) + has_age), 3.2), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, int(len(columns) + has_age))))
    tables = []
    for ax, column in zip(axes, columns):
        values = _text(frame[column]).replace("", "unknown")
        rates = cast(pd.DataFrame, frame.groupby(values)["has_mask"].agg(images="size", positive="sum"))
        rates["positive_rate"] = (rates["positive"] / rates["images"]).round(3)
        ax.bar(rates.index, rates["positive_rate"], color=POSITIVE_COLOUR)
        for x, (rate, count) in enumerate(zip(rates["positive_rate"], rates["images"])):
            ax.annotate(f"n={count}", (x, rate), ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.12)
        ax.set_title(f"positive rate by {DEMOGRAPHICS[column]}")
        tables.append(f"By {DEMOGRAPHICS[column]}:\n\n" + _markdown_table(rates.reset_index(names=column)))
    if has_age:
        ax = axes[-1]
        ages = pd.to_numeric(frame["age"], errors="coerce")
        shown = ages.between(*AGE_RANGE)
        bins = np.arange(AGE_RANGE[0], AGE_RANGE[1] + 5, 5)
        for flag, colour, label in (
            (False, NEGATIVE_COLOUR, "no pneumothorax"),
            (True, POSITIVE_COLOUR, "pneumothorax"),
        ):
            ax.hist(
                ages[shown & (frame["has_mask"] == flag)],
                bins=bins,
                color=colour,
                label=label,
                density=True,
                histtype="step",
                linewidth=2,
            )
        ax.set_xlabel("age (years)")
        ax.set_ylabel("density (per class)")
        ax.set_title("age")
        ax.legend(fontsize=8)
        outside = int((ages.notna() & ~shown).sum())
        tables.append(
            f"Ages: median {ages[shown].median():.0f}; {int(ages.isna().sum())} unknown, {outside} "
            f"outside {AGE_RANGE[0]}-{AGE_RANGE[1]} left out of the histogram (normalised per class)."
        )
    name = _link(save_figure(fig, figures / "patients.png", FIGURE_DPI))
    return f"## Patients\n\n![positive rate by sex, view and age]({name})\n\n" + "\n\n".join(tables)


def _text(column: pd.Series) -> pd.Series:
    """A metadata column as stripped strings, "" where empty (pandas reads an all-empty column as floats)."""
    return column.astype("string").fillna("").str.strip()


def _gallery(table: pd.DataFrame, prepared: layout.Where, size: int, rng: np.random.Generator, figures: Path) -> str:
    positive = table[table["has_mask"]].sort_values("mask_area")
    negative = table[~table["has_mask"]]
    # Positives spread from the smallest to the largest mask, so the gallery shows the range of lesions.
    picks = np.unique(np.linspace(0, len(positive) - 1, min(GALLERY_POSITIVE, len(positive))).round().astype(int))
    drawn = np.sort(rng.choice(len(negative), min(GALLERY_NEGATIVE, len(negative)), replace=False))
    chosen = pd.concat([positive.iloc[picks], negative.iloc[drawn]])
    if chosen.empty:
        return ""
    tiles = [_outlined(row, number, prepared, size) for number, row in enumerate(chosen.itertuples(index=False), 1)]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % GALLERY_COLUMNS)
    rows = [np.hstack(tiles[start : start + GALLERY_COLUMNS]) for start in range(0, len(tiles), GALLERY_COLUMNS)]
    write_png(figures / "gallery.png", np.vstack(rows))
    name = _link(figures / "gallery.png")
    captions = [
        f"{row.ImageId}: "
        + (f"area {row.mask_area}, {row.n_instances} instance(s)" if row.has_mask else "no pneumothorax")
        for row in chosen.itertuples(index=False)
    ]
    return (
        f"## Gallery\n\n![training images with their masks outlined]({name})\n\n{len(chosen)} training "
        f"images at {size}x{size} with the outline of their stored mask, numbered as below: positives from "
        f"the smallest to the largest mask, then random images without pneumothorax.\n\n"
        + "\n".join(f"{number}. {caption}" for number, caption in enumerate(captions, 1))
    )


def _outlined(row, number: int, prepared: layout.Where, size: int) -> np.ndarray:
    """One gallery tile: the image in RGB with its mask's outline and its number drawn on it."""
    image = cv2.cvtColor(read_png(layout.images_dir(prepared, size) / f"{row.ImageId}.png"), cv2.COLOR_GRAY2RGB)
    mask = read_png(layout.masks_dir(prepared, size) / f"{row.ImageId}.png")
    draw_outline(image, mask, OUTLINE_RGB, max(1, size // 256))
    # A one-pixel black frame keeps neighbouring tiles apart.
    cv2.rectangle(image, (0, 0), (size - 1, size - 1), (0, 0, 0), 1)
    scale = max(0.35, size / 400)
    cv2.putText(
        image,
        str(number),
        (4, int(4 + 22 * scale)),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        NUMBER_RGB,
        max(1, round(scale * 1.5)),
        cv2.LINE_AA,
    )
    return image


def _gallery_size(sizes: list[int]) -> int:
    large = [size for size in sizes if size >= GALLERY_MIN_SIZE]
    return min(large) if large else max(sizes)


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _link(path: Path) -> str:
    """A figure's path relative to the report."""
    return f"{FIGURE_FOLDER}/{path.name}"
