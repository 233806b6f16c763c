"""Ctrl-C: one line naming where the run stopped, exit code 130, and run_all.sh adds no "failed"."""

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pneumoseg import layout, logs
from pneumoseg.cli import run_stage_script
from pneumoseg.stages import train as train_stage
from pneumoseg.training.trainer import Trainer
from synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def test_places_nest_and_stay_after_an_exception():
    logs.clear()
    with pytest.raises(KeyboardInterrupt), logs.place("fold 1"):
        with logs.place("epoch 2 of 3"):
            pass
        with logs.place("epoch 3 of 3"):
            raise KeyboardInterrupt
    assert logs.interrupted_message() == "interrupted in fold 1, epoch 3 of 3; rerun the same command to continue"
    logs.clear()
    assert logs.interrupted_message() == "interrupted; rerun the same command to continue"


@pytest.mark.slow
def test_an_interrupted_stage_says_where_it_stopped_once_and_exits_130(tiny_cfg, tmp_path, monkeypatch, caplog):
    cfg = tiny_cfg(f"data.image_size={SIZE}")
    write_prepared(cfg.paths.prepared_dir, n_images=16, sizes=(SIZE,), n_folds=2)
    calls = {"n": 0}
    original = Trainer._update

    def interrupt_at_the_third_update(self):  # two updates an epoch: the first update of epoch 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(Trainer, "_update", interrupt_at_the_third_update)
    argv = [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"paths.input_dir={tmp_path / 'input'}",
        f"paths.output_root={tmp_path / 'output'}",
        f"data.image_size={SIZE}",
        "train.epochs=3",
    ]
    with caplog.at_level(logging.ERROR):
        code = run_stage_script(train_stage.DESCRIPTION, train_stage.stage, train_stage.parser, argv, number="03")
    assert code == 130
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == ["interrupted in fold 0, epoch 2 of 3; rerun the same command to continue"]


@pytest.mark.slow
def test_ctrl_c_in_run_all_passes_130_through_without_failed(tiny_cfg, tmp_path):
    overrides = [
        f"paths.input_dir={tmp_path / 'input'}",
        f"paths.output_root={tmp_path / 'output'}",
        f"data.image_size={SIZE}",
        "train.epochs=5000",  # far more than the run lasts: a late Ctrl-C must still find it training
        "train.early_stopping=null",
        "train.folds=[0]",
    ]
    cfg = tiny_cfg(*overrides[2:])
    write_prepared(cfg.paths.prepared_dir, n_images=16, sizes=(SIZE,), n_folds=2)
    fold_dir = layout.fold_dir(cfg, 0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A new session: the signal goes to the whole group, as a terminal's Ctrl-C does.
    # Its output goes to a file, not a pipe: unread, a pipe's buffer would fill and stall the run under load.
    log = (tmp_path / "run_all.log").open("w")
    process = subprocess.Popen(
        [
            "bash",
            str(ROOT / "run_all.sh"),
            str(ROOT / "configs" / "tiny.yaml"),
            "--from",
            "03",
            "--to",
            "03",
            *overrides,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # As a terminal's shell starts a command: with SIGINT's default action, even where this test runs in the
        # background of a non-interactive shell (which ignores SIGINT, and an ignored signal stays ignored in children).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (fold_dir / "last.pt").exists():  # the first epoch is done
            assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be stopped"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=300)
    finally:  # a run the signal did not stop must not go on training after the test
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    output = (tmp_path / "run_all.log").read_text()
    assert process.returncode == 130, output
    assert "failed" not in output and "Traceback" not in output, output
    assert output.count("interrupted in fold 0, epoch ") == 1, output
    assert "; rerun the same command to continue" in output
