"""``--force`` means "redo once": rerunning a forced command after a kill continues that forced run."""

import logging
from pathlib import Path

import pandas as pd
import pytest

from crash import run_killed_at_update, run_killed_in
from pneumoseg import layout
from pneumoseg.stages import demo_data
from pneumoseg.stages import train as train_stage
from pneumoseg.stages.record import FORCE_RUN_ENV, FORCED_FILE
from pneumoseg.training.trainer import Trainer
from synthetic import write_prepared

SMALL = ("demo.n_train=12", "demo.n_test=4", "demo.image_size=128", "demo.n_jobs=1")
SIZE = 32


def _demo(cfg, force):
    return demo_data.run(cfg, force=force)


def test_stage_00_forced_and_killed_continues_on_the_same_forced_command(tiny_cfg, monkeypatch, caplog):
    cfg = tiny_cfg(*SMALL)
    _demo(cfg, force=False)
    # killed after the images, before the label tables
    run_killed_in(monkeypatch, demo_data, "write_text", lambda: _demo(cfg, force=True))
    with caplog.at_level(logging.INFO):
        summary = _demo(cfg, force=True)  # the same command again
    assert summary["written"] == 0 and summary["reused"] == 16
    assert "config changed" not in caplog.text and "continuing the forced run" in caplog.text
    assert not (Path(cfg.paths.input_dir) / FORCED_FILE).exists()
    assert _demo(cfg, force=True)["written"] == 16  # a new forced command redoes it again


def test_a_forced_run_all_command_skips_the_stages_it_already_redid(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(*SMALL)
    monkeypatch.setenv(FORCE_RUN_ENV, "run-1")
    assert _demo(cfg, force=True)["written"] == 16
    assert _demo(cfg, force=True)["written"] == 16  # the same command, rerun: skipped, its summary
    calls = []
    monkeypatch.setattr(demo_data, "_make_images", lambda *a: calls.append(a))
    _demo(cfg, force=True)
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setenv(FORCE_RUN_ENV, "run-2")  # another forced command redoes it
    assert _demo(tiny_cfg(*SMALL), force=True)["written"] == 16


@pytest.mark.slow
def test_stage_03_forced_and_killed_continues_where_it_stopped(tiny_cfg, tmp_path, monkeypatch, caplog):
    cfg = tiny_cfg(f"data.image_size={SIZE}", "train.epochs=2", "train.oof_size=16")
    write_prepared(cfg.paths.prepared_dir, n_images=16, sizes=(SIZE,), n_folds=2)
    train_stage.run(cfg)
    run_killed_at_update(monkeypatch, lambda: train_stage.run(cfg, force=True))  # in fold 0, epoch 2
    updates = {"n": 0}
    original = Trainer._update

    def count(self):
        updates["n"] += 1
        original(self)

    monkeypatch.setattr(Trainer, "_update", count)
    with caplog.at_level(logging.INFO):
        summary = train_stage.run(cfg, force=True)
    assert summary["complete"] and "continuing the forced run" in caplog.text
    # fold 0's epoch 2 (2 updates), then fold 1 afresh (4): its earlier training does not count as redone
    assert updates["n"] == 6
    log = pd.read_csv(layout.fold_log_path(layout.fold_dir(cfg, 0)))
    assert log["epoch"].tolist() == [1, 2]
    assert not (layout.train_dir(cfg) / FORCED_FILE).exists()
