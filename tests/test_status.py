"""``scripts/status.py``: one state per stage (done, stale, running, failed, not started), each from a file the stage
or its runner left, and the finished stages' headline figures."""

import os
import subprocess
import sys

import pytest

from pneumoseg import layout, stage_table
from pneumoseg.cli import run_stage_script
from pneumoseg.errors import DataError
from pneumoseg.io import write_json
from pneumoseg.stages import status
from pneumoseg.stages.record import StageRecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _line(cfg, number: str) -> str:
    return next(line for line in status.report(cfg).splitlines() if line.startswith(f"  {number} "))


def _finish(cfg, number: str, sections=("train",), summary=None, when: float | None = None) -> None:
    """Record stage ``number`` as finished for ``cfg`` (at ``when``, a time in seconds, if given)."""
    record = StageRecord(stage_table.stage(number).name, stage_table.stage(number).folder(cfg), cfg, sections)
    record.start()
    record.finish(summary)
    if when is not None:
        os.utime(record.done_path, (when, when))


def test_status_lists_every_stage_and_the_finished_ones_headlines(tiny_cfg):
    cfg = tiny_cfg()
    record = StageRecord("04_search_thresholds", layout.search_dir(cfg), cfg, ["search"])
    record.start()
    (layout.search_dir(cfg) / "oof_report.md").write_text("# report\n")
    record.finish({"oof_score": 0.81234567, "empty_baseline": 0.75})
    text = status.report(cfg)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[1:] if not line.lstrip().startswith("->")] == [
        "00",
        "01",
        "02",
        "03",
        "04",
        "05",
        "06",
    ]  # tiny has a demo section
    assert "04 threshold search" in text and "oof_score 0.8123, empty_baseline 0.7500" in text
    assert f"-> {layout.search_dir(cfg) / 'oof_report.md'}" in text
    assert sum(" not started " in line for line in lines) == 6


def test_a_stage_done_for_this_config_is_done(tiny_cfg):
    cfg = tiny_cfg()
    _finish(cfg, "03")
    assert " done " in _line(cfg, "03")


def test_a_stage_done_for_another_config_is_stale(tiny_cfg):
    _finish(tiny_cfg(), "03")
    line = _line(tiny_cfg("train.epochs=5"), "03")  # the override makes stage 03 rerun
    assert " stale " in line and "done for another config" in line and "scripts/03_train.py" in line
    assert " done " in _line(tiny_cfg("search.refine_steps=2"), "03")  # a section stage 03 does not read
    _finish(tiny_cfg(), "04", ("search",))
    line = _line(tiny_cfg("train.epochs=5"), "04")  # done on the old training
    assert " stale " in line and "stage 03 is stale" in line


def test_a_stage_whose_input_stage_finished_after_it_is_stale(tiny_cfg):
    cfg = tiny_cfg()
    _finish(cfg, "04", ("search",), when=1_000_000)
    for number in ("05", "06"):
        _finish(cfg, number, ("predict",), when=2_000_000)
    _finish(cfg, "04", ("search",), when=3_000_000)  # stage 04 again, as --force does
    assert " done " in _line(cfg, "04")
    for number in ("05", "06"):
        line = _line(cfg, number)
        assert " stale " in line and "stage 04 finished after it" in line


def test_a_stage_in_a_live_process_is_running_with_its_fold_and_epoch(tiny_cfg):
    cfg = tiny_cfg("train.epochs=5")
    log_path = layout.fold_log_path(layout.fold_dir(cfg, 1))
    log_path.parent.mkdir(parents=True)
    log_path.write_text("epoch,lr,train_loss\n0,0.1,0.5\n1,0.1,0.4\n")  # two epochs finished
    with stage_table.tracking(layout.train_dir(cfg)):
        line = _line(cfg, "03")
    assert " running " in line and "fold 1, epoch 3 of 5" in line and f"pid {os.getpid()}" in line
    assert " not started " in _line(cfg, "03")  # the marker went with the process


def test_the_marker_of_a_dead_process_is_not_running(tiny_cfg):
    cfg = tiny_cfg()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = stage_table._marker_name(stage_table.socket.gethostname(), int(dead.stdout))
    write_json(
        layout.train_dir(cfg) / marker,
        {"pid": int(dead.stdout), "host": stage_table.socket.gethostname(), "started": 0},
    )
    assert " not started " in _line(cfg, "03")


def test_a_stage_that_raised_is_failed_with_its_error_line(tiny_cfg, tmp_path):
    cfg = tiny_cfg()

    def failing(cfg, args):
        raise DataError("stage 03 has not finished: done.json is missing.\nRun scripts/03_train.py first.")

    code = run_stage_script(
        "x",
        failing,
        number="04",
        argv=[
            "--config",
            os.path.join(ROOT, "configs", "tiny.yaml"),
            f"paths.input_dir={tmp_path / 'input'}",
            f"paths.output_root={tmp_path / 'output'}",
        ],
    )
    assert code == 1
    line = _line(cfg, "04")
    assert " failed " in line and "DataError: stage 03 has not finished: done.json is missing." in line
    with pytest.raises(RuntimeError), stage_table.tracking(layout.search_dir(cfg)):
        raise RuntimeError("a bug")
    assert "RuntimeError: a bug" in _line(cfg, "04")
    with stage_table.tracking(layout.search_dir(cfg)):
        pass  # a new run clears the old failure
    assert " not started " in _line(cfg, "04")


def test_a_stage_with_no_record_is_not_started_with_the_folds_done(tiny_cfg):
    cfg = tiny_cfg()
    assert " not started " in _line(cfg, "03")
    StageRecord("03_train fold 0", layout.fold_dir(cfg, 0), cfg, ("train",)).finish()
    assert "folds [0] done" in _line(cfg, "03")


def test_status_and_the_leaderboard_show_the_training_phases(tiny_cfg):
    from pneumoseg.evaluation import leaderboard
    from pneumoseg.io import write_json

    cfg = tiny_cfg()
    phases = [{"name": "small", "epochs": 3, "val_dice": 0.5}, {"name": "full", "epochs": 2, "val_dice": 0.7}]
    other = [{"name": "small", "epochs": 3, "val_dice": 0.6}, {"name": "full", "epochs": 2, "val_dice": 0.8}]
    record = StageRecord("03_train", layout.train_dir(cfg), cfg, ["train"])
    record.start()
    record.finish({"folds": [0, 1], "fold_summaries": {"0": {"phases": phases}, "1": {"phases": other}}})
    assert "phases: small (3 epochs, val_dice 0.5500) -> full (2 epochs, val_dice 0.7500)" in status.report(cfg)
    write_json(layout.search_dir(cfg) / "done.json", {"summary": {"oof_score": 0.8, "nested_score": 0.7}})
    [run] = leaderboard.collect(layout.train_dir(cfg).parent.parent)
    assert run.phases == ["small", "full"] and "| tiny (phases: small -> full) |" in leaderboard.markdown([run])


def test_run_all_reads_the_stages_of_the_config_from_the_table(capsys):
    stage_table.main([os.path.join(ROOT, "configs", "tiny.yaml")])
    assert capsys.readouterr().out.split() == [part for row in stage_table.STAGES for part in (row.number, row.script)]
    stage_table.main([os.path.join(ROOT, "configs", "demo_ensemble.yaml")])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "03 scripts/train_members.py",
        "04 scripts/04_search_thresholds.py",
        "05 scripts/05_predict.py",
        "06 scripts/06_package_model.py",
    ]
