"""The leaderboard: every experiment under an output folder side by side, the table a competitor reads to decide
what to submit.

A run is any folder under the output root with a finished stage 04 (``04_search/done.json``), so an experiment
and, once they exist, an ensemble of experiments are listed alike. For each run it reads what the stages recorded:

* stage 04's ``done.json`` summary (the numbers of ``oof_report.json``): the OOF score of the chosen
  post-processing, the nested (held-out-fold) estimate, and each fold's nested score, whose spread (standard
  deviation, minimum and maximum over the folds) says how far the nested estimate can be trusted;
* stage 05's ``done.json``: the test score, where held-out test labels exist (the demo), and the image-level AUC
  there;
* the detector figures of stage 04's summary: image-level AUC, and sensitivity and specificity at the chosen
  operating point, on the OOF images (:mod:`pneumoseg.evaluation.detection`);
* the all-empty baseline (every image predicted empty; stage 04's, over the OOF images): a run whose nested estimate
  (or OOF score, without one) or test score is below it has learned less than predicting nothing, and is marked;
* stage 03's ``done.json``: training time, the sum of the folds' times (folds may run in parallel);
* the checkpoints the run predicts with (``predict.checkpoints`` and ``predict.top_k`` of the config stage 04 ran
  with): the parameters of one network and the bytes of all of them.

An ensemble of experiments (its ``04_search/ensemble.json``) is listed with the members stage 04 chose: its training
time, parameters (one network of each member) and checkpoint bytes are the sums over those members, read from the
members' own folders.

Runs are sorted by nested score, best first (runs without one, a single fold, last, by OOF score). A folder whose
records are unreadable is left out with a warning naming the file. Written: ``leaderboard.md`` (the table) and
``leaderboard.png`` (nested score, each fold's nested score and the OOF and test scores per run).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from pneumoseg import layout
from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path, read_json, write_text
from pneumoseg.logs import setup_logging
from pneumoseg.modeling.checkpoints import best_files, load_checkpoint
from pneumoseg.stage_table import DONE_FILE, command, stage

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One row of the leaderboard (None: not known for this run).

    Attributes:
        name: the run's folder name (the experiment).
        folder: the run's folder.
        nested_score: stage 04's nested estimate; oof_score: its in-sample OOF score.
        fold_scores: each fold's nested score (its in-sample score when there is no nested estimate).
        test_score: stage 05's score on held-out test labels.
        postprocess: the chosen post-processing, as text.
        checkpoints: which checkpoints it predicts with, e.g. ``best, 2 per fold, 5 folds``.
        train_seconds: the sum of the folds' training times.
        parameters: parameters of one network; checkpoint_bytes: bytes of all the checkpoints it predicts with.
        members: an ensemble's chosen members (empty for a single experiment).
        phases: the names of its training phases, in order (``train.phases``; empty without phases).
        auc, sensitivity, specificity: the OOF images' image-level AUC and the rates at the operating point.
        test_auc: the image-level AUC on held-out test labels.
        empty_baseline: the score of predicting every OOF image empty (stage 04's).
    """

    name: str
    folder: Path
    nested_score: float | None
    oof_score: float
    fold_scores: list[float] = field(default_factory=list)
    test_score: float | None = None
    postprocess: str = ""
    checkpoints: str = ""
    train_seconds: float | None = None
    parameters: int | None = None
    checkpoint_bytes: int | None = None
    members: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    auc: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    test_auc: float | None = None
    empty_baseline: float | None = None

    @property
    def below_baseline(self) -> bool:
        """Whether the nested estimate (the OOF score without one) or the test score is below the all-empty one."""
        if self.empty_baseline is None:
            return False
        estimate = self.nested_score if self.nested_score is not None else self.oof_score
        return any(score is not None and score < self.empty_baseline for score in (estimate, self.test_score))

    @property
    def spread(self) -> float | None:
        """Standard deviation of the fold scores (None with fewer than two folds)."""
        return float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else None


def find_runs(output_root: str | os.PathLike) -> list[Path]:
    """Every folder under ``output_root`` with a finished stage 04, sorted by path."""
    return sorted(path.parent.parent for path in Path(output_root).rglob(f"{stage('04').folder_name}/{DONE_FILE}"))


def _summary(folder: Path, number: str) -> dict[str, Any] | None:
    """The ``summary`` of stage ``number``'s ``done.json`` in the run folder ``folder``; None when the stage has not
    finished."""
    path = stage(number).folder(folder) / DONE_FILE
    if not path.is_file():
        return None
    return read_json(path, f"{path} is missing", f"rerun {command(number)}").get("summary", {})


def read_run(folder: str | os.PathLike) -> Run:
    """The leaderboard row of one run folder.

    Raises:
        DataError: stage 04's record is missing, unreadable or lacks its scores.
    """
    folder = Path(folder)
    search = _summary(folder, "04")
    if search is None or "oof_score" not in search:
        raise DataError(f"{stage('04').folder(folder) / DONE_FILE} holds no OOF score; rerun {command('04')}")
    per_fold = search.get("per_fold", [])
    fold_scores = [f["nested_score"] if f.get("nested_score") is not None else f["score"] for f in per_fold]
    run = Run(
        name=folder.name,
        folder=folder,
        nested_score=search.get("nested_score"),
        oof_score=float(search["oof_score"]),
        fold_scores=[float(s) for s in fold_scores],
        postprocess=_block_text(search.get("chosen")),
        empty_baseline=search.get("empty_baseline"),
    )
    predict = _summary(folder, "05") or {}
    run.test_score = predict.get("test_score")
    run.test_auc = predict.get("test_auc")
    detection = search.get("detection") or {}
    run.auc = detection.get("auc")
    run.sensitivity, run.specificity = (
        (detection.get("operating_point") or {}).get(key, {}).get("value") for key in ("sensitivity", "specificity")
    )
    if layout.ensemble_path_in(folder).is_file():
        _read_ensemble(run, folder)
    else:
        run.train_seconds = _train_seconds(folder)
        run.phases = _phases(folder)
        _read_models(run, folder)
    return run


def _train_seconds(folder: Path) -> float | None:
    """The sum of the folds' training times of a run folder (None when not every fold recorded one)."""
    train = _summary(folder, "03") or {}
    seconds = [f.get("seconds") for f in train.get("fold_summaries", {}).values()]
    return float(sum(seconds)) if seconds and None not in seconds else None


def _phases(folder: Path) -> list[str]:
    """The names of a run folder's training phases, in order, from its first fold's summary ([] without)."""
    folds = list(((_summary(folder, "03") or {}).get("fold_summaries") or {}).values())
    return [str(phase.get("name")) for phase in folds[0].get("phases") or []] if folds else []


def _read_ensemble(run: Run, folder: Path) -> None:
    """Fill in an ensemble's chosen members and, from their own folders, the sums of their training times,
    parameters and checkpoint bytes (None when a member's is unknown)."""
    choice = layout.ensemble_path_in(folder)
    content = read_json(choice, f"{choice} is missing", f"rerun {command('04')}")
    folders = {m["name"]: Path(m["experiment_dir"]) for m in content["members"]}
    run.members = list(content["chosen"]["members"])
    parts = []
    for name in run.members:
        # A folder recorded relative to where stage 04 ran; the member usually sits beside the ensemble.
        member_folder = folders[name] if folders[name].is_dir() else folder.parent / name
        member = Run(
            name=name,
            folder=member_folder,
            nested_score=None,
            oof_score=0.0,
            train_seconds=_train_seconds(member_folder),
        )
        # A member needs no stage 04 of its own: its stage 03 config says what it predicts with.
        _read_models(member, member_folder, "03")
        parts.append(member)
    run.checkpoints = " + ".join(f"{m.name}: {m.checkpoints or 'n/a'}" for m in parts)
    for key in ("train_seconds", "parameters", "checkpoint_bytes"):
        values = [getattr(m, key) for m in parts]
        setattr(run, key, None if None in values else sum(values))


def _block_text(block: dict | None) -> str:
    if not block:
        return "n/a"
    params = ", ".join(
        f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in block.get("params", {}).items()
    )
    return f"{block.get('name')} ({params})"


def _read_models(run: Run, folder: Path, number: str = "04") -> None:
    """Fill in the checkpoints the run predicts with (as the ``predict`` section of the config of stage ``number``
    says), their bytes and one network's parameters."""
    config = stage(number).folder(folder) / "config.yaml"
    train = stage("03").folder(folder)
    if not config.is_file() or not train.is_dir():
        return
    predict = cast(DictConfig, OmegaConf.load(config)).get("predict", {})
    which, top_k = str(predict.get("checkpoints", "best")), int(predict.get("top_k", 1))
    files = [
        path
        for fold_folder in layout.fold_dirs(train).values()
        for path in best_files(layout.checkpoints_dir(fold_folder, which))[:top_k]
    ]
    if not files:
        return
    per_fold = len(files) / max(len(layout.fold_dirs(train)), 1)
    run.checkpoints = f"{which}, {per_fold:g} per fold, {len(layout.fold_dirs(train))} folds"
    run.checkpoint_bytes = sum(path.stat().st_size for path in files)
    state = load_checkpoint(files[0])["state_dict"]
    # Parameters only: BatchNorm statistics and counters are buffers, not learnt weights.
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    run.parameters = int(sum(t.numel() for name, t in state.items() if not name.endswith(buffers)))


def sort_runs(runs: Sequence[Run]) -> list[Run]:
    """Best first: by nested score, then (runs without a nested score, after the others) by OOF score."""
    return sorted(runs, key=lambda r: (r.nested_score is None, -(r.nested_score or 0.0), -r.oof_score))


def collect(output_root: str | os.PathLike) -> list[Run]:
    """The sorted leaderboard of every run under ``output_root``; unreadable runs are left out with a warning."""
    runs = []
    for folder in find_runs(output_root):
        try:
            runs.append(read_run(folder))
        except (DataError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
            log.warning("leaderboard: %s left out: %s", folder, exc)
    return sort_runs(runs)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def markdown(runs: Sequence[Run], plot_name: str | None = None) -> str:
    """The leaderboard as a Markdown document: one table row per run, best first."""
    lines = [
        "# Leaderboard",
        "",
        "Sorted by the nested estimate (the post-processing chosen on the other folds, scored on each "
        "held-out fold): the score to expect on new images. Fold spread: standard deviation [min, max] of "
        "the folds' nested scores. Test: the submission's score where held-out labels exist. Training: the "
        "sum of the folds' times. AUC, sens., spec.: the OOF images judged as a detector (image-level AUC, "
        "sensitivity and specificity at the chosen operating point); test AUC: on held-out labels. An ensemble "
        "lists the members it chose; its training time, parameters (one network per member) and checkpoints "
        "are its members' summed. All empty: the score of predicting every image empty; a run marked **below "
        "all-empty** scores under it (nested or test) and has learned less than predicting nothing.",
        "",
    ]
    if plot_name:
        lines += [f"![nested score per run]({plot_name})", ""]
    lines += [
        "| # | run | nested | OOF | fold spread | test | all empty | post-processing | checkpoints | training | "
        "parameters | checkpoint MB | AUC | sens. | spec. | test AUC |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rank, run in enumerate(runs, 1):
        spread = (
            "n/a"
            if run.spread is None
            else f"{run.spread:.4f} [{min(run.fold_scores):.4f}, {max(run.fold_scores):.4f}]"
        )
        parameters = "n/a" if run.parameters is None else f"{run.parameters / 1e6:.2f} M"
        size = "n/a" if run.checkpoint_bytes is None else f"{run.checkpoint_bytes / 1e6:.1f}"
        name = f"{run.name} (ensemble: {' + '.join(run.members)})" if run.members else run.name
        name += f" (phases: {' -> '.join(run.phases)})" if run.phases else ""
        name += " **below all-empty**" if run.below_baseline else ""
        lines.append(
            f"| {rank} | {name} | {_fmt(run.nested_score)} | {_fmt(run.oof_score)} | {spread} | "
            f"{_fmt(run.test_score)} | {_fmt(run.empty_baseline)} | {run.postprocess} | "
            f"{run.checkpoints or 'n/a'} | {_duration(run.train_seconds)} | {parameters} | {size} | "
            f"{_fmt(run.auc, 3)} | {_fmt(run.sensitivity, 3)} | {_fmt(run.specificity, 3)} | "
            f"{_fmt(run.test_auc, 3)} |"
        )
    if not runs:
        lines.append("| | no run with a finished stage 04 | | | | | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Run], path: Path) -> Path:
    """Per run, best at the top: the nested score (bar), each fold's nested score (dots), the OOF score and the
    test score (markers), the all-empty baseline (a grey line across the run's row); a run below it is named so."""
    fig = Figure(figsize=(8, 1.2 + 0.55 * max(len(runs), 1)), layout="constrained")
    ax = fig.subplots()
    rows = np.arange(len(runs))[::-1]
    nested = [r.nested_score if r.nested_score is not None else np.nan for r in runs]
    ax.barh(rows, nested, color="#9ecae1", label="nested estimate")
    for row, value in zip(rows, nested):
        if not np.isnan(value):
            ax.annotate(f"{value:.4f}", (value, row), xytext=(3, 8), textcoords="offset points", fontsize=8)
    for row, run in zip(rows, runs):
        ax.scatter(
            run.fold_scores,
            [row] * len(run.fold_scores),
            color="#08519c",
            s=14,
            zorder=3,
            label="folds (nested)" if row == rows[0] else None,
        )
    ax.scatter([r.oof_score for r in runs], rows, marker="|", s=300, color="black", zorder=4, label="OOF (in-sample)")
    tested = [(row, r.test_score) for row, r in zip(rows, runs) if r.test_score is not None]
    if tested:
        ax.scatter(
            [t for _, t in tested],
            [row for row, _ in tested],
            marker="D",
            color="#d95f0e",
            s=30,
            zorder=5,
            label="test",
        )
    baselines = [(row, r.empty_baseline) for row, r in zip(rows, runs) if r.empty_baseline is not None]
    if baselines:
        ax.vlines(
            [b for _, b in baselines],
            [row - 0.45 for row, _ in baselines],
            [row + 0.45 for row, _ in baselines],
            colors="grey",
            linestyles="--",
            zorder=6,
            label="all empty",
        )
    values = [
        v
        for r in runs
        for v in (*r.fold_scores, r.oof_score, r.nested_score, r.test_score, r.empty_baseline)
        if v is not None
    ]
    low = min(values, default=0.0)
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_yticks(rows, [f"{r.name} (below all-empty)" if r.below_baseline else r.name for r in runs])
    ax.set_xlabel("mean Dice (the challenge metric)")
    ax.set_title("Leaderboard: nested estimate per run, best at the top")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=4, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def write_leaderboard(
    output_root: str | os.PathLike, markdown_path: Path | None = None, plot_path: Path | None = None
) -> list[Run]:
    """Collect the runs under ``output_root`` and write the table and the plot.

    Args:
        output_root: the folder holding the runs (``paths.output_root``).
        markdown_path: where the table goes; default ``<output_root>/leaderboard.md``.
        plot_path: where the plot goes; default ``<output_root>/leaderboard.png``.

    Returns:
        The runs, best first.
    """
    root = Path(output_root)
    if not root.is_dir():
        raise DataError(f"output folder {root} not found: give the paths.output_root the experiments ran with")
    markdown_path = markdown_path or root / "leaderboard.md"
    plot_path = plot_path or root / "leaderboard.png"
    runs = collect(root)
    plot(runs, plot_path)
    write_text(markdown_path, markdown(runs, os.path.relpath(plot_path, markdown_path.parent)))
    return runs


def cli(argv: Sequence[str] | None = None) -> int:
    """``scripts/leaderboard.py [--output-root DIR] [--markdown PATH] [--plot PATH]``: write the leaderboard, print
    the table; exit code 0, or 1 when the output folder does not exist."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-root", default="output", help="the folder holding the runs (default: output)")
    parser.add_argument("--markdown", type=Path, default=None, help="default: <output-root>/leaderboard.md")
    parser.add_argument("--plot", type=Path, default=None, help="default: <output-root>/leaderboard.png")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        runs = write_leaderboard(args.output_root, args.markdown, args.plot)
    except DataError as exc:
        log.error("%s", exc)
        return 1
    print(markdown(runs))
    return 0
