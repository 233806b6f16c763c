"""The OOF report of stage 04: its numbers (``oof_report.json``), a readable page (``oof_report.md``) with plots in
``plots/``, and the summary table the script prints.

Plots: the search surface (Dice against ``top`` and ``min_area`` at the best ``bottom``, and against the threshold),
the per-fold scores, every fold's training curves from its ``log.csv``, and a gallery of the worst false positives,
the worst misses on positive images and a few good cases, each an X-ray with the truth and the prediction outlined.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pneumoseg.data.resize import resize
from pneumoseg.io import write_json, write_text
from pneumoseg.postprocess.search import SearchResult
from pneumoseg.postprocess.strategies import ORIGINAL_SIZE, build_postprocessor
from pneumoseg.reports import detection as detection_report
from pneumoseg.reports.figures import draw_outline, save_figure

log = logging.getLogger(__name__)

PLOTS = "plots"
PLOT_FILES = {
    "search": "search.png",
    "folds": "folds.png",
    "training": "training_curves.png",
    "gallery": "gallery.png",
    "tradeoff": "tradeoff.png",
    **detection_report.PLOT_FILES,
}
REPORT_JSON, REPORT_MD = "oof_report.json", "oof_report.md"
FIGURE_DPI = 110
TRUTH_COLOUR = (40, 220, 40)  # RGB: green outline
PREDICTION_COLOUR = (255, 40, 40)  # RGB: red outline

CaseLoader = Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""ImageId -> (X-ray uint8 H x W, truth mask, predicted mask); the masks at any one resolution."""


def report_numbers(
    result: SearchResult, per_image: pd.DataFrame, chosen: dict, default: dict, oof_size: int, seconds: float
) -> dict[str, Any]:
    """The content of ``oof_report.json``.

    Args:
        result: the search's candidates and per-fold sums.
        per_image: one row per OOF image, in the search's order: ``fold, true_area, pred_area, dice,
            default_dice`` (areas at the OOF size) for the chosen and the default strategy.
        chosen, default: the two strategies' ``{name, params}`` blocks.
        oof_size: side of the OOF maps in pixels.
        seconds: time the search took.
    """
    positive = per_image["true_area"] > 0
    predicted = per_image["pred_area"] > 0
    nested = result.nested
    per_fold = []
    fold: Any  # a group key: pandas types it as any scalar
    for k, (fold, rows) in enumerate(per_image.groupby("fold", sort=True)):
        entry: dict[str, Any] = {
            "fold": int(fold),
            "n_images": len(rows),
            "n_positive": int((rows["true_area"] > 0).sum()),
            "score": float(rows["dice"].mean()),
            "default_score": float(rows["default_dice"].mean()),
            "empty_baseline": float((rows["true_area"] == 0).mean()),
        }
        if nested is not None:
            entry.update(nested_score=float(nested.scores[k]), nested_choice=nested.choices[k])
        per_fold.append(entry)
    candidates = result.candidates
    best_per_strategy = {}
    for gated in (False, True):
        for strategy in candidates["strategy"].unique():
            found = result.rows_of(strategy, gated)
            if found.size:
                row = result.best_of(strategy, gated)
                best_per_strategy[f"gated {strategy}" if gated else strategy] = {
                    "score": float(candidates["dice"].iloc[row]),
                    "block": result.block(row),
                    "n_candidates": int(found.size),
                }
    return {
        "n_images": len(per_image),
        "n_positive": int(positive.sum()),
        "n_folds": len(per_fold),
        "oof_size": int(oof_size),
        "oof_score": float(per_image["dice"].mean()),
        "chosen": chosen,
        "nested_score": None if nested is None else nested.score,
        "default_score": float(per_image["default_dice"].mean()),
        "default": default,
        "empty_baseline": float((~positive).mean()),
        "positive_dice": _mean(per_image.loc[positive, "dice"]),
        "false_positive_rate": _mean(predicted[~positive]),
        "false_negative_rate": _mean(~predicted[positive]),
        "per_fold": per_fold,
        "best_per_strategy": best_per_strategy,
        "gate": gate_numbers(result),
        "n_candidates": len(candidates),
        "search_seconds": round(seconds, 2),
        "objective": result.objective.to_block(),
        "nested_constraint_met": None if nested is None else nested.met_share,
    }


def gate_numbers(result: SearchResult) -> dict[str, Any] | None:
    """The score with and without the gate: the best ungated and the best gated candidate (in-sample OOF) and the
    nested estimate of choosing among each alone (None with a single fold); None when no gate was searched."""
    gated_rows = result.rows_of(gated=True)
    if not gated_rows.size:
        return None
    thresholds = sorted(set(result.candidates["gate"].iloc[gated_rows].tolist()))
    numbers: dict[str, Any] = {"thresholds": thresholds}
    for name, gated in (("ungated", False), ("gated", True)):
        row = result.best_of(gated=gated)
        nested = result.nested_by_gate.get(name)
        numbers[name] = {
            "oof_score": float(result.candidates["dice"].iloc[row]),
            "block": result.block(row),
            "nested_score": None if nested is None else nested.score,
            "n_candidates": int(result.rows_of(gated=gated).size),
        }
    return numbers


def _mean(values: pd.Series) -> float | None:
    """The mean, or None for no values (no positive or no empty images)."""
    return float(values.mean()) if len(values) else None


@dataclass(frozen=True)
class Gallery:
    """What the report's gallery shows.

    Args:
        case: loads an image of the gallery.
        n_cases: images per gallery row.
        thumbnail_size: side of each gallery image in pixels.
    """

    case: CaseLoader
    n_cases: int
    thumbnail_size: int


def write_report(
    folder: Path,
    numbers: dict,
    result: SearchResult,
    per_image: pd.DataFrame,
    logs: Mapping[int, Path],
    gallery: Gallery,
) -> None:
    """Write the plots and ``oof_report.md`` into ``folder`` (the stage writes ``numbers`` to ``oof_report.json``).

    Args:
        folder: the stage's folder.
        numbers: from :func:`report_numbers`.
        result: the search result (for the search surface).
        per_image: as for :func:`report_numbers`, with ``ImageId`` and ``score`` (and the metadata columns of
            :func:`pneumoseg.reports.detection.with_metadata`) for the detector's curves.
        logs: each fold's ``log.csv`` (a missing one is left out of the curves, with a warning).
        gallery: the gallery's images and their size.
    """
    paths = {key: folder / PLOTS / name for key, name in PLOT_FILES.items()}
    plots = {
        "search": plot_search(result, numbers, paths["search"]),
        "folds": plot_folds(numbers, paths["folds"]),
        "tradeoff": plot_tradeoff(result, paths["tradeoff"]),
        "training": plot_training_curves(logs, paths["training"]),
        "gallery": plot_gallery(
            gallery_cases(per_image, gallery.n_cases), gallery.case, gallery.thumbnail_size, paths["gallery"]
        ),
    }
    if numbers.get("detection") is not None:
        plots.update(detection_report.write_plots(folder / PLOTS, per_image, numbers["detection"]))
    write_text(folder / REPORT_MD, render_markdown(numbers, plots))


def add_test_score(folder: Path, test_score: float, n_images: int) -> None:
    """Put stage 05's score on held-out labels beside the OOF figures, in ``oof_report.json`` and ``.md``.

    Stage 05 calls this after scoring its submission (it runs after stage 04, which cannot know the score).
    Rerunning stage 04 writes the report afresh without it, until stage 05 scores the new choice.

    Args:
        folder: stage 04's folder; nothing is done when it lacks the report (``oof_report.json`` and ``.md``).
        test_score: the submission's mean Dice on the held-out labels.
        n_images: how many held-out images it was scored on.
    """
    _add_to_report(folder, "test", {"score": float(test_score), "n_images": int(n_images)})


def add_runtime_check(folder: Path, check: dict) -> None:
    """Put stage 06's measure of the served runtime against torch (which made the OOF maps) in the report: the
    figures of :func:`pneumoseg.stages.package.check_onnx` (Dice between the two submissions, the test score
    through each, the largest probability difference), as ``served_runtime`` in ``oof_report.json`` and a section of
    ``.md``. Nothing is done when ``folder`` lacks the report."""
    _add_to_report(folder, "served_runtime", {"runtime": "onnxruntime", **check})


def _add_to_report(folder: Path, key: str, value: dict) -> None:
    """Set ``key`` of ``oof_report.json`` to ``value`` and write ``oof_report.md`` again (nothing without them)."""
    path = folder / REPORT_JSON
    if not path.is_file() or not (folder / REPORT_MD).is_file():
        log.info("no OOF report in %s to add %s to", folder, key)
        return
    numbers = json.loads(path.read_text())
    numbers[key] = value
    write_json(path, numbers)
    plots = {
        key: folder / PLOTS / name if (folder / PLOTS / name).is_file() else None for key, name in PLOT_FILES.items()
    }
    write_text(folder / REPORT_MD, render_markdown(numbers, plots))


def plot_search(result: SearchResult, numbers: dict, path: Path) -> Path:
    """Left (when the triplet was searched): its Dice over ``top`` x ``min_area`` at its best ``bottom``; right:
    each strategy's best Dice at each mask threshold (``threshold``, or the triplet's ``bottom``)."""
    heat = result.surfaces.get("triplet")
    fig = Figure(figsize=(12 if heat else 6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if heat else 1, squeeze=False)[0]
    curve_ax = axes[-1]
    for strategy, (grid, scores) in result.surfaces.items():
        profile = scores.reshape(-1, len(grid.bottoms))
        valid = ~np.isnan(profile).all(0)
        curve_ax.plot(grid.bottoms[valid], np.nanmax(profile[:, valid], axis=0), marker="o", ms=3, label=strategy)
    curve_ax.axhline(numbers["empty_baseline"], color="grey", ls=":", label="all empty")
    curve_ax.axhline(numbers["default_score"], color="black", ls="--", lw=0.8, label="default")
    curve_ax.set(
        xlabel="mask threshold (threshold, or the triplet's bottom)",
        ylabel="OOF dice",
        title="Best dice at each mask threshold (no component filter)",
    )
    curve_ax.legend(fontsize=8)
    if heat:
        grid, scores = heat
        top, area, bottom = np.unravel_index(np.nanargmax(scores), scores.shape)
        image = axes[0].imshow(scores[:, :, bottom], origin="lower", aspect="auto", cmap="viridis")
        axes[0].set_xticks(range(len(grid.min_areas)), [f"{a:g}" for a in grid.min_areas], rotation=90, fontsize=7)
        axes[0].set_yticks(range(len(grid.tops)), [f"{t:g}" for t in grid.tops], fontsize=7)
        axes[0].plot(area, top, marker="*", color="red", ms=12)
        chosen = numbers["chosen"]
        axes[0].set(
            xlabel="min_area (pixels of the 1024 px image)",
            ylabel="top",
            title=f"triplet: OOF dice at bottom={grid.bottoms[bottom]:g} (star: its best, "
            f"{np.nanmax(scores):.4f}; white: top < bottom, not a candidate)\n"
            f"chosen: {chosen['name']}, OOF dice {numbers['oof_score']:.4f} (the report's score)",
        )
        fig.colorbar(image, ax=axes[0], label="OOF dice")
    return save_figure(fig, path, FIGURE_DPI)


def best_dice_by_sensitivity(candidates: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The trade-off: at each image-level sensitivity reached by some candidate, the best OOF Dice among the
    candidates whose sensitivity is at least that (ascending sensitivities)."""
    sensitivity = candidates["sensitivity"].to_numpy()
    dice = candidates["dice"].to_numpy()
    levels = np.unique(sensitivity)
    order = np.argsort(sensitivity)
    # The best Dice at sensitivity >= s is a running maximum from the most sensitive candidate down.
    running = np.maximum.accumulate(dice[order][::-1])[::-1]
    return levels, running[np.searchsorted(sensitivity[order], levels, side="left")]


def plot_tradeoff(result: SearchResult, path: Path) -> Path | None:
    """The best OOF Dice reachable at each image-level sensitivity, with every candidate and the chosen one."""
    candidates = result.candidates
    if "sensitivity" not in candidates or candidates["sensitivity"].isna().all():
        return None
    levels, best = best_dice_by_sensitivity(candidates)
    fig = Figure(figsize=(6, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(candidates["sensitivity"], candidates["dice"], s=4, color="lightgrey", label="candidates")
    ax.step(levels, best, where="post", color="C0", label="best dice at sensitivity >= x")
    chosen = candidates.iloc[result.best]
    ax.plot(chosen["sensitivity"], chosen["dice"], marker="*", ms=14, color="red", ls="", label="chosen")
    objective = result.objective
    if objective.rate == "sensitivity":
        ax.axvline(objective.minimum, color="red", ls=":", lw=0.8, label="constraint")
    ax.set(xlabel="image-level sensitivity (OOF)", ylabel="OOF dice", title="Dice against sensitivity")
    ax.legend(fontsize=8)
    return save_figure(fig, path, FIGURE_DPI)


def plot_folds(numbers: dict, path: Path) -> Path:
    """Bars per fold: the chosen strategy (in-sample), the nested estimate, the default and the all-empty score."""
    folds = numbers["per_fold"]
    series = {
        "chosen (in-sample)": "score",
        "nested": "nested_score",
        "default": "default_score",
        "all empty": "empty_baseline",
    }
    series = {label: key for label, key in series.items() if key in folds[0]}
    fig = Figure(figsize=(max(5, 1.6 * len(folds) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(len(folds))
    for k, (label, key) in enumerate(series.items()):
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, [f[key] for f in folds], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, [f"fold {f['fold']}\n({f['n_images']} img)" for f in folds])
    ax.set(ylabel="dice", ylim=(0, 1.25), yticks=np.linspace(0, 1, 6), title="Per-fold OOF dice")
    ax.legend(fontsize=8, loc="upper center", ncols=len(series))
    return save_figure(fig, path, FIGURE_DPI)


def plot_training_curves(logs: Mapping[int, Path], path: Path) -> Path | None:
    """Each fold's loss and validation metrics against the epoch; None when no fold has a log."""
    frames = {}
    for fold, log_path in logs.items():
        if log_path.is_file():
            frames[fold] = pd.read_csv(log_path)
        else:
            log.warning("fold %s has no training log at %s; its curves are left out of the report", fold, log_path)
    if not frames:
        return None
    # Numeric columns only: val_postprocess names the strategy that gave val_dice (text, not a curve).
    metrics = sorted(
        {
            c
            for f in frames.values()
            for c in f.columns
            if c.startswith("val_") and c != "val_loss" and pd.api.types.is_numeric_dtype(f[c])
        }
    )
    columns = min(2, 1 + len(metrics))
    rows = -(-(1 + len(metrics)) // columns)
    fig = Figure(figsize=(6 * columns, 4 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[1 + len(metrics) :]:
        ax.axis("off")
    for k, (fold, frame) in enumerate(sorted(frames.items())):
        # Markers keep a one-epoch run visible.
        style = {"color": f"C{k % 10}", "marker": "o", "ms": 3}
        for column, line in (("train_loss", "-"), ("val_loss", "--")):
            if column in frame:
                axes[0].plot(
                    frame["epoch"], frame[column], ls=line, label=f"fold {fold} {column.split('_')[0]}", **style
                )
        for ax, metric in zip(axes[1:], metrics):
            if metric in frame:
                ax.plot(frame["epoch"], frame[metric], label=f"fold {fold}", **style)
    axes[0].set(ylabel="loss", title="loss (solid: train, dashed: validation)")
    for ax, metric in zip(axes[1:], metrics):
        ax.set(ylabel=metric, title=metric)
    for ax in axes[: 1 + len(metrics)]:
        ax.set(xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.legend(fontsize=7)
    return save_figure(fig, path, FIGURE_DPI)


def gallery_cases(per_image: pd.DataFrame, n_cases: int) -> dict[str, pd.DataFrame]:
    """The gallery's rows: the largest false positives on empty images, the positive images scored worst (missed
    ones first, largest first), and the positive images scored best."""
    positive = per_image[per_image["true_area"] > 0]
    false_positive = per_image[(per_image["true_area"] == 0) & (per_image["pred_area"] > 0)]
    rows = {
        "worst false positives": false_positive.sort_values("pred_area", ascending=False, kind="stable"),
        "worst misses": positive.sort_values(["dice", "true_area"], ascending=[True, False], kind="stable"),
        "good cases": positive[positive["dice"] > 0].sort_values(["dice", "true_area"], ascending=False, kind="stable"),
    }
    return {title: frame.head(n_cases) for title, frame in rows.items()}


def outlined(xray: np.ndarray, truth: np.ndarray, prediction: np.ndarray, size: int) -> np.ndarray:
    """An RGB ``size`` px thumbnail of ``xray`` with the truth and the prediction outlined in two colours."""
    image = cv2.cvtColor(resize(xray, size, size, "area"), cv2.COLOR_GRAY2RGB)
    # The truth is drawn thicker and first, so that a prediction on the same outline leaves it visible.
    for mask, colour, thickness in ((truth, TRUTH_COLOUR, 2), (prediction, PREDICTION_COLOUR, 1)):
        mask = resize(mask.astype(np.uint8), size, size, "nearest")
        draw_outline(image, mask, colour, thickness)
    return image


def plot_gallery(cases: Mapping[str, pd.DataFrame], case: CaseLoader, size: int, path: Path) -> Path | None:
    """One row per gallery category; None when every category is empty."""
    cases = {title: frame for title, frame in cases.items() if len(frame)}
    if not cases:
        return None
    columns = max(len(frame) for frame in cases.values())
    fig = Figure(figsize=(2.4 * columns, 2.7 * len(cases)), layout="constrained")
    axes = fig.subplots(len(cases), columns, squeeze=False)
    item: Any  # a row of the frame: pandas types its fields as any scalar
    for row, (title, frame) in zip(axes, cases.items()):
        for ax in row:
            ax.axis("off")
        for ax, item in zip(row, frame.itertuples()):
            xray, truth, prediction = case(item.ImageId)
            scale = ORIGINAL_SIZE**2 / truth.size
            ax.imshow(outlined(xray, truth, prediction, size))
            ax.set_title(
                f"{title}\n…{item.ImageId[-10:]} dice {item.dice:.2f}\n"
                f"true {item.true_area * scale:.0f} / pred {item.pred_area * scale:.0f} px",
                fontsize=7,
            )
    fig.suptitle("truth: green, prediction: red (areas in pixels of the 1024 px image)", fontsize=9)
    return save_figure(fig, path, FIGURE_DPI)


def _block_text(block: dict) -> str:
    """``name`` (key=value, ...), the parameters in the strategy's own order (a stored block has them sorted)."""
    strategy = build_postprocessor(block).to_block()
    if strategy["name"] == "gated":
        return f"`gated` (gate={strategy['params']['gate']:g}) {_block_text(strategy['params']['inner'])}"
    params = ", ".join(f"{key}={value:g}" for key, value in strategy["params"].items())
    return f"`{strategy['name']}` ({params})"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render_markdown(numbers: dict, plots: Mapping[str, Path | None]) -> str:
    """``oof_report.md``: the numbers as tables, with the plots embedded by relative path."""
    lines = [
        "# Out-of-fold report",
        "",
        f"{numbers['n_images']} OOF images ({numbers['n_positive']} with pneumothorax) from {numbers['n_folds']} "
        f"folds, maps of {numbers['oof_size']} px made by torch; {numbers['n_candidates']} post-processing candidates "
        f"searched "
        f"in {numbers['search_seconds']} s.",
        "",
        f"Chosen: {_block_text(numbers['chosen'])}. Areas are pixels of the 1024 px image. Every candidate is scored "
        f"as the submission is: the OOF map brought to the image's original size as stage 05 brings a test map "
        f"back, post-processed there, against the truth of the label file at that size.",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| OOF dice of the chosen strategy (in-sample best) | {_fmt(numbers['oof_score'])} |",
        f"| nested estimate (chosen on the other folds, scored on each held-out fold) | "
        f"{_fmt(numbers['nested_score'])} |",
        f"| default {_block_text(numbers['default'])} | {_fmt(numbers['default_score'])} |",
        f"| every image predicted empty | {_fmt(numbers['empty_baseline'])} |",
        _test_row(numbers.get("test")),
        f"| dice on positive images | {_fmt(numbers['positive_dice'])} |",
        f"| false-positive rate on empty images | {_fmt(numbers['false_positive_rate'])} |",
        f"| false-negative rate on positive images (predicted empty) | {_fmt(numbers['false_negative_rate'])} |",
        "",
        *detection_report.markdown_lines(numbers.get("detection"), plots, PLOTS),
        *ensemble_lines(numbers.get("ensemble")),
        "## Best candidate of each strategy",
        "",
        "| strategy | candidates | dice | parameters |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {name} | {best['n_candidates']} | {best['score']:.4f} | {_block_text(best['block'])} |"
            for name, best in numbers["best_per_strategy"].items()
        ),
        "",
        *_gate_lines(numbers.get("gate")),
        *_runtime_lines(numbers.get("served_runtime")),
        "## Folds",
        "",
        "| fold | images | positive | chosen | nested | chosen on the other folds | default | all empty |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        *(
            f"| {f['fold']} | {f['n_images']} | {f['n_positive']} | {f['score']:.4f} | "
            f"{_fmt(f.get('nested_score'))} | {_block_text(f['nested_choice']) if 'nested_choice' in f else 'n/a'} | "
            f"{f['default_score']:.4f} | {f['empty_baseline']:.4f} |"
            for f in numbers["per_fold"]
        ),
        "",
        _image("per-fold scores", plots["folds"]),
        "",
        "## Search",
        "",
        *_objective_lines(numbers),
        _image("search surface", plots["search"]),
        "",
        _image("best dice at each sensitivity", plots.get("tradeoff")),
        "",
        "## Training curves",
        "",
        _image("training curves", plots["training"], "No fold has a training log (`log.csv`)."),
        "",
        "## Gallery",
        "",
        _image("gallery", plots["gallery"], "No false positive and no positive image to show."),
        "",
    ]
    return "\n".join(lines)


def _objective_lines(numbers: dict) -> list[str]:
    """What the search maximised; with a constraint, how often the nested choice met it on the held-out fold."""
    objective = numbers.get("objective") or {"name": "dice", "params": {}}
    if objective["name"] == "dice":
        return ["Objective: the best mean Dice.", ""]
    ((key, value),) = objective["params"].items()
    met = numbers.get("nested_constraint_met")
    held_out = "n/a (one fold)" if met is None else f"{met:.0%} of the held-out folds"
    return [
        f"Objective: the best mean Dice with an image-level {key.removeprefix('min_')} of at least {value:g} "
        f"(`{objective['name']}`); the nested choice met it on {held_out}.",
        "",
    ]


def _gate_lines(gate: dict | None) -> list[str]:
    """The report's section on the gate: the best candidates with and without it, in-sample and nested."""
    if gate is None:
        return []
    thresholds = ", ".join(f"{t:g}" for t in gate["thresholds"])
    return [
        "## With and without the gate",
        "",
        f"Gated candidates: every grid behind each gate threshold ({thresholds}); an image whose gate probability "
        f"is below the threshold is predicted empty. Nested: the choice among those candidates alone, made on the "
        f"other folds and scored on each held-out fold.",
        "",
        "| candidates | number | OOF dice (best) | nested | best parameters |",
        "| --- | ---: | ---: | ---: | --- |",
        *(
            f"| {name} | {gate[name]['n_candidates']} | {gate[name]['oof_score']:.4f} | "
            f"{_fmt(gate[name]['nested_score'])} | {_block_text(gate[name]['block'])} |"
            for name in ("ungated", "gated")
        ),
        "",
    ]


def ensemble_lines(ensemble: dict | None) -> list[str]:
    """The report's ensemble section (none for a single experiment): each member, and every member, pair and the
    whole ensemble with its OOF and nested scores, the chosen one marked; from stage 04's ``ensemble.json``."""
    if ensemble is None:
        return []
    chosen = ensemble["chosen"]["members"]
    return [
        "## Ensemble",
        "",
        f"Members of `{ensemble['ensemble']}`; each candidate's OOF maps are blended per image at its original size "
        f"with the members' weights, and its post-processing searched on the blend. The best nested estimate is "
        f"chosen: **{' + '.join(chosen)}**, which stages 05 and 06 deliver. The report above is that blend's.",
        "",
        "| member | weight | encoder | image size |",
        "| --- | ---: | --- | ---: |",
        *(f"| {m['name']} | {m['weight']:g} | {m['model']} | {m['image_size']} |" for m in ensemble["members"]),
        "",
        "| candidate | weights | OOF dice | nested estimate | post-processing |",
        "| --- | --- | ---: | ---: | --- |",
        *(
            f"| {' + '.join(c['members'])}{' (chosen)' if c['members'] == chosen else ''} | "
            f"{', '.join(f'{w:g}' for w in c['weights'])} | {c['oof_score']:.4f} | {_fmt(c['nested_score'])} | "
            f"{_block_text(c['postprocess'])} |"
            for c in ensemble["candidates"]
        ),
        "",
    ]


def _runtime_lines(check: dict | None) -> list[str]:
    """The section on the served runtime, when stage 06 measured it against torch's (the OOF maps')."""
    if check is None:
        return []
    lines = [
        "## Served runtime",
        "",
        f"The OOF maps were made by torch; the package (stage 06) serves with {check['runtime']} on the CPU. "
        f"Both predicted {check['images']} images ({check['images_from']}):",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| Dice between the torch and {check['runtime']} submissions | {check['dice_between_runtimes']:.6f} |",
        f"| share of mask pixels that differ | {check['mask_share_differing']:.3g} |",
        f"| largest probability difference | {check['max_probability_difference']:.3g} |",
    ]
    if "test_score_torch" in check:
        lines += [
            f"| test score through torch | {check['test_score_torch']:.4f} |",
            f"| test score through {check['runtime']} | {check['test_score_onnxruntime']:.4f} |",
        ]
    return [*lines, ""]


def _test_row(test: dict | None) -> str:
    if test is None:
        return "| held-out test set (stage 05) | n/a: no held-out labels scored for this choice |"
    return f"| held-out test set ({test['n_images']} images, scored by stage 05) | {test['score']:.4f} |"


def _image(alt: str, path: Path | None, missing: str = "") -> str:
    return f"![{alt}]({PLOTS}/{path.name})" if path else missing


def summary_table(numbers: dict) -> str:
    """A short plain-text table of the headline numbers and the per-fold scores, for the terminal."""
    rows = [
        ("chosen", _block_text(numbers["chosen"]).replace("`", "")),
        ("OOF dice (in-sample best)", _fmt(numbers["oof_score"])),
        ("nested estimate", _fmt(numbers["nested_score"])),
        ("default " + _block_text(numbers["default"]).replace("`", ""), _fmt(numbers["default_score"])),
        ("all empty", _fmt(numbers["empty_baseline"])),
        ("dice on positives", _fmt(numbers["positive_dice"])),
        ("false-positive rate", _fmt(numbers["false_positive_rate"])),
        ("false-negative rate", _fmt(numbers["false_negative_rate"])),
    ]
    if numbers.get("nested_constraint_met") is not None:
        ((key, value),) = numbers["objective"]["params"].items()
        rows.append((f"nested: {key} {value:g} met on", f"{numbers['nested_constraint_met']:.0%} of held-out folds"))
    detection = numbers.get("detection")
    if detection is not None:
        rows += [
            (f"image-level {name}", detection_report.interval_text(figure))
            for name, figure in (
                ("AUC", detection["overall"]["auc"]),
                ("sensitivity", detection["operating_point"]["sensitivity"]),
                ("specificity", detection["operating_point"]["specificity"]),
            )
        ]
    gate = numbers.get("gate")
    if gate is not None:
        rows += [
            (f"best {name} OOF / nested", f"{_fmt(gate[name]['oof_score'])} / {_fmt(gate[name]['nested_score'])}")
            for name in ("ungated", "gated")
        ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"OOF search: {numbers['n_images']} images ({numbers['n_positive']} positive), "
        f"{numbers['n_candidates']} candidates, {numbers['search_seconds']} s"
    ]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines.append(f"  {'fold':>6} {'images':>7} {'chosen':>8} {'nested':>8} {'default':>8}")
    lines += [
        f"  {f['fold']:>6} {f['n_images']:>7} {f['score']:>8.4f} {_fmt(f.get('nested_score')):>8} "
        f"{f['default_score']:>8.4f}"
        for f in numbers["per_fold"]
    ]
    return "\n".join(lines)
