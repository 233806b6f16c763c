"""Where a config's pipeline stands: each stage's folder, whether it is complete for this config, what it said
when it finished, and the files worth opening. ``run_all.sh`` prints this at the end; ``scripts/status.py``
prints it any time."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.cli import run_stage_script
from pneumoseg.config import ensemble_members, is_ensemble
from pneumoseg.stages.record import DONE_FILE

DESCRIPTION = "Show where the pipeline of a config stands: each stage done or not, its headline figures and reports."

# The headline of each stage's done.json summary, where it has one worth a line.
_HEADLINES = {
    "01": ("converted", "failed"),
    "02": ("train_images", "positive_images", "test_images"),
    "04": ("oof_score", "empty_baseline", "nested_score"),
    "05": ("images", "positive", "test_score", "oof_score"),
}


def _stages(cfg: DictConfig) -> list[tuple[str, str, Path, list[Path]]]:
    """(number, name, folder, files to open) of every stage; an ensemble's stage 03 is each member's."""
    if is_ensemble(cfg):
        members = [("03", f"training {m.name}", layout.train_dir(m.cfg), []) for m in ensemble_members(cfg)]
        return members + [stage for stage in _experiment_stages(cfg) if stage[0] > "03"]
    return _experiment_stages(cfg)


def _experiment_stages(cfg: DictConfig) -> list[tuple[str, str, Path, list[Path]]]:
    return [
        ("00", "demo data", Path(cfg.paths.input_dir), []),
        ("01", "DICOM to PNG", layout.convert_dir(cfg), [layout.metadata_path(cfg)]),
        ("02", "labels and folds", layout.labels_dir(cfg),
         [layout.labels_dir(cfg) / "data_report.md", layout.folds_path(cfg)]),
        ("03", "training", layout.train_dir(cfg), []),
        ("04", "threshold search", layout.search_dir(cfg),
         [layout.search_dir(cfg) / "oof_report.md", layout.thresholds_path(cfg), layout.ensemble_path(cfg)]),
        ("05", "prediction", layout.predict_dir(cfg), [layout.submission_path(cfg)]),
        ("06", "model package", layout.package_dir(cfg), [layout.package_path(cfg)]),
    ]


def report(cfg: DictConfig) -> str:
    """A few lines per stage; stage 00 only for configs with a ``demo`` section."""
    lines = [f"pipeline status for experiment {cfg.experiment!r}:"]
    for number, name, folder, files in _stages(cfg):
        if number == "00" and "demo" not in cfg:
            continue
        try:
            done = json.loads((folder / DONE_FILE).read_text())
        except (OSError, ValueError):
            lines.append(f"  {number} {name:<17} not done   ({folder})")
            continue
        summary = done.get("summary", {})
        facts = ", ".join(f"{key} {_fmt(summary[key])}" for key in _HEADLINES.get(number, ()) if key in summary)
        lines.append(f"  {number} {name:<17} done {done.get('finished_at', '')}  {facts}".rstrip())
        lines.extend(f"       WARNING: {warning}" for warning in summary.get("warnings", []))
        lines.extend(f"       -> {path}" for path in files if path.exists())
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def cli(cfg: DictConfig, args) -> None:
    print(report(cfg))


def main(argv: list[str] | None = None) -> int:
    """``pneumoseg status --config CONFIG [key=value ...]`` (and ``scripts/status.py``): print :func:`report`."""
    return run_stage_script(DESCRIPTION, cli, argv=argv)
