"""The README's ``metric_definitions`` for SageMaker's automatic model tuning find the right numbers in the real log
lines of stage 03, run as a job runs it (the script, its own process, its log on stderr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pneumoseg import layout
from pneumoseg.config import load_config
from pneumoseg.sagemaker.tuning import METRIC_DEFINITIONS, metric_values, oof_line
from synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def test_every_definition_is_a_valid_sagemaker_metric():
    names = [d["Name"] for d in METRIC_DEFINITIONS]
    assert len(set(names)) == len(names) and {"oof_dice", "val_dice", "train_loss", "val_loss"} <= set(names)
    assert all(0 < len(d["Regex"]) <= 500 for d in METRIC_DEFINITIONS)  # the API's length limit


def test_the_oof_regex_reads_its_own_line_and_not_a_per_epoch_dice():
    text = "fold 0 epoch 1/2: lr 1.00e-03 train_loss 0.5000 val_loss 0.4000 val_dice 0.7000 (x)\n" + oof_line(
        0.81234, 16, [0, 1]
    )
    assert metric_values(text) == {"oof_dice": [0.8123], "val_dice": [0.7], "train_loss": [0.5], "val_loss": [0.4]}


@pytest.mark.slow
def test_each_regex_finds_the_numbers_stage_03_logged(tmp_path):
    overrides = [
        f"paths.input_dir={tmp_path / 'input'}",
        f"paths.output_root={tmp_path / 'output'}",
        f"data.image_size={SIZE}",
        "train.epochs=2",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    write_prepared(cfg.paths.prepared_dir, n_images=16, sizes=(SIZE,), n_folds=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "03_train.py"),
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = metric_values(result.stdout + result.stderr)

    logs = [pd.read_csv(layout.fold_log_path(layout.fold_dir(cfg, fold))) for fold in (0, 1)]
    for name in ("val_dice", "train_loss", "val_loss"):
        logged = [round(v, 4) for log in logs for v in log[name]]
        assert found[name] == pytest.approx(logged, abs=1e-9), name
    summaries = json.loads((layout.train_dir(cfg) / "done.json").read_text())["summary"]["fold_summaries"]
    held_out = sum(s["n_val"] for s in summaries.values())
    expected = sum(s["best"]["val_dice"] * s["n_val"] for s in summaries.values()) / held_out
    assert held_out == 16 and found["oof_dice"] == [pytest.approx(round(expected, 4), abs=1e-9)]
