"""Where a config's pipeline stands: for each stage of the stage table (:mod:`pneumoseg.stage_table`) one state, what
it said when it finished, and the files worth opening. ``run_all.sh`` prints this at the end; ``scripts/status.py``
prints it any time.

The states, each decided from a file the stage or its runner left in the stage's folder:

* ``running``: a live process holds the folder's running marker (:func:`pneumoseg.stage_table.running`: its pid on
  this host; a marker of another host while it is recent). Stage 03 adds the fold and epoch from the newest
  ``fold<k>/log.csv`` of a fold that has not finished (one row per finished epoch);
* ``failed``: ``failed.json`` (:func:`pneumoseg.stage_table.write_failure`) is newer than any ``done.json``: the
  error's line;
* ``stale``: ``done.json`` was written for another config (its fingerprint recomputed from this config,
  :func:`pneumoseg.stages.record.recorded_for`), or a stage it reads finished after it or is stale itself;
* ``done``: ``done.json`` for this config, with its headline figures;
* ``not started``: none of these (stage 03 adds the folds already done).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pneumoseg import layout, stage_table
from pneumoseg.cli import run_stage_script
from pneumoseg.config import ensemble_members, is_ensemble
from pneumoseg.stage_table import DONE_FILE, Stage
from pneumoseg.stages.record import read_done, recorded_for

# The headline of each stage's done.json summary, where it has one worth a line.
_HEADLINES = {
    "01": ("converted", "failed"),
    "02": ("train_images", "positive_images", "test_images"),
    "04": ("oof_score", "empty_baseline", "nested_score"),
    "05": ("images", "positive", "test_score", "oof_score"),
}


@dataclass
class StageState:
    """One line of the status.

    Attributes:
        row: the stage.
        title: its title here (an ensemble member's training names the member).
        state: ``done``, ``stale``, ``running``, ``failed`` or ``not started``.
        detail: what the state rests on (the error, the fold and epoch, why it is stale), or "".
        done: the stage's ``done.json``, or None.
        files: the stage's files worth opening that exist.
    """

    row: Stage
    title: str
    state: str
    detail: str = ""
    done: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)


def _rows(cfg: DictConfig) -> list[tuple[Stage, str, DictConfig]]:
    """(stage, title, config it runs on) of every stage of ``cfg``; an ensemble's stage 03 is each member's."""
    rows = [
        (row, row.title, cfg)
        for row in stage_table.stages_for(cfg)
        if row is not stage_table.ENSEMBLE_TRAINING and (row.number != "00" or "demo" in cfg)
    ]
    if is_ensemble(cfg):
        members = [(stage_table.stage("03"), f"training {m.name}", m.cfg) for m in ensemble_members(cfg)]
        return members + rows
    return rows


def _files(cfg: DictConfig, number: str) -> list[Path]:
    """The files of stage ``number`` worth opening."""
    files = {
        "01": [layout.metadata_path(cfg)],
        "02": [layout.labels_dir(cfg) / "data_report.md", layout.folds_path(cfg)],
        "04": [layout.search_dir(cfg) / "oof_report.md", layout.thresholds_path(cfg), layout.ensemble_path(cfg)],
        "05": [layout.submission_path(cfg)],
        "06": [layout.package_path(cfg)],
    }
    return [path for path in files.get(number, []) if path.exists()]


def _finished_at(folder: Path) -> float | None:
    """When the stage of ``folder`` last finished (its ``done.json``'s time), or None."""
    path = folder / DONE_FILE
    return path.stat().st_mtime if path.is_file() else None


def _read_times(cfg: DictConfig, row: Stage) -> dict[str, float]:
    """When each stage ``row`` reads last finished; on an ensemble config stage 03 is its last member's."""
    times: dict[str, float] = {}
    for number in row.reads:
        if number == "03" and is_ensemble(cfg):
            found = [_finished_at(layout.train_dir(m.cfg)) for m in ensemble_members(cfg)]
        else:
            found = [_finished_at(stage_table.stage(number).folder(cfg))]
        known = [t for t in found if t is not None]
        if known:
            times[number] = max(known)
    return times


def _training_progress(cfg: DictConfig, folder: Path) -> str:
    """``fold k, epoch e of n``: the fold of ``folder`` (a stage 03 folder) whose ``log.csv`` changed last among
    those not finished, and the epoch it is in (its log has a row per finished epoch)."""
    paths = [
        (layout.fold_log_path(fold_folder), fold)
        for fold, fold_folder in layout.fold_dirs(folder).items()
        if not (fold_folder / DONE_FILE).is_file()
    ]
    logs = [(path.stat().st_mtime, fold, path) for path, fold in paths if path.is_file()]
    epochs = int(cfg.train.epochs)
    if not logs:
        return "starting"
    _, fold, path = max(logs)
    finished = max(len(path.read_text().splitlines()) - 1, 0)
    return f"fold {fold}, epoch {min(finished + 1, epochs)} of {epochs}"


def _folds_done(folder: Path) -> str:
    """``folds [0, 1] done`` for a stage 03 folder with some finished folds, else ""."""
    done = [fold for fold, fold_folder in layout.fold_dirs(folder).items() if (fold_folder / DONE_FILE).is_file()]
    return f"folds {done} done" if done else ""


def stage_state(cfg: DictConfig, row: Stage, title: str | None = None) -> StageState:
    """The state of stage ``row`` for ``cfg``; see the module docstring.

    Args:
        cfg: the resolved config the stage runs on.
        row: the stage.
        title: its title in the status (default the row's).
    """
    folder = row.folder(cfg)
    title = title or row.title
    done = read_done(folder)
    files = _files(cfg, row.number)
    processes = stage_table.running_markers(folder)
    if processes:
        where = ", ".join(f"pid {p['pid']} on {p['host']}" for p in processes)
        progress = f"{_training_progress(cfg, folder)}; " if row.number == "03" else ""
        return StageState(row, title, "running", f"{progress}{where}", done, files)
    failure = stage_table.read_failure(folder)
    finished = _finished_at(folder)
    if failure is not None and (finished is None or float(failure.get("time", 0)) >= finished):
        return StageState(row, title, "failed", f"{failure['error']} ({failure.get('at', '')})", done, files)
    if done is None or finished is None:
        detail = (_folds_done(folder) if row.number == "03" else "") or str(folder)
        return StageState(row, title, "not started", detail, None, files)
    if recorded_for(done, cfg) is False:
        return StageState(
            row, title, "stale", f"done for another config; rerun {stage_table.command(row.number)}", done, files
        )
    later = [number for number, when in _read_times(cfg, row).items() if when > finished]
    if later:
        return StageState(
            row,
            title,
            "stale",
            f"stage {', '.join(later)} finished after it; rerun {stage_table.command(row.number)}",
            done,
            files,
        )
    return StageState(row, title, "done", "", done, files)


def states(cfg: DictConfig) -> list[StageState]:
    """The state of every stage of ``cfg`` (stage 00 only for configs with a ``demo`` section). A stage done on the
    outputs of a stale stage is stale too."""
    result: list[StageState] = []
    for row, title, run_cfg in _rows(cfg):
        state = stage_state(run_cfg, row, title)
        behind = sorted(
            {f"stage {s.row.number} is stale" for s in result if s.row.number in row.reads and s.state == "stale"}
        )
        if state.state == "done" and behind:
            state.state, state.detail = "stale", f"{', '.join(behind)}; rerun {stage_table.command(row.number)}"
        result.append(state)
    return result


def report(cfg: DictConfig) -> str:
    """A few lines per stage: its state, its headline figures when done (or stale), and its files."""
    lines = [f"pipeline status for experiment {cfg.experiment!r}:"]
    for state in states(cfg):
        parts = [f"  {state.row.number} {state.title:<17} {state.state}"]
        phase_line: list[str] = []
        if state.state in ("done", "stale") and state.done is not None:
            summary = state.done.get("summary", {})
            parts[0] += f" {state.done.get('finished_at', '')}".rstrip()
            parts.append(
                ", ".join(
                    f"{key} {_fmt(summary[key])}" for key in _HEADLINES.get(state.row.number, ()) if key in summary
                )
            )
            phase_line = _phase_lines(summary)
        parts.append(f"({state.detail})" if state.detail else "")
        lines.append("  ".join(part for part in parts if part))
        lines.extend(phase_line)
        if state.state in ("done", "stale") and state.done is not None:
            lines.extend(f"       WARNING: {warning}" for warning in state.done.get("summary", {}).get("warnings", []))
        if state.state in ("done", "stale"):
            lines.extend(f"       -> {path}" for path in state.files)
    return "\n".join(lines)


def _phase_lines(summary: dict) -> list[str]:
    """For a stage 03 trained in phases (its folds' summaries list ``phases``): one line naming the phases in
    order, with each one's epochs and mean best val_dice over the folds."""
    folds = [fold.get("phases") for fold in summary.get("fold_summaries", {}).values()]
    if not folds or not all(folds):
        return []
    parts = []
    for k, phase in enumerate(folds[0]):
        scores = [fold[k].get("val_dice") for fold in folds if len(fold) > k]
        score = _fmt(sum(scores) / len(scores)) if scores and None not in scores else "n/a"
        parts.append(f"{phase['name']} ({phase.get('epochs')} epochs, val_dice {score})")
    return [f"       phases: {' -> '.join(parts)}"]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def stage(cfg: DictConfig, args: argparse.Namespace) -> None:
    """The script's entry: print :func:`report`."""
    print(report(cfg))


def main(argv: list[str] | None = None) -> int:
    """``pneumoseg status --config CONFIG [key=value ...]``: print :func:`report`; the exit code."""
    return run_stage_script(__doc__ or "", stage, argv=argv)
