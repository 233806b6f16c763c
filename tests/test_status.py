from pneumoseg.stages import status
from pneumoseg.stages.record import StageRecord
from pneumoseg import layout


def test_status_lists_every_stage_and_the_finished_ones_headlines(tiny_cfg):
    cfg = tiny_cfg()
    record = StageRecord("04_search_thresholds", layout.search_dir(cfg), cfg, ["search"])
    record.start()
    (layout.search_dir(cfg) / "oof_report.md").write_text("# report\n")
    record.finish({"oof_score": 0.81234567, "empty_baseline": 0.75})
    text = status.report(cfg)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[1:] if not line.lstrip().startswith("->")] == \
        ["00", "01", "02", "03", "04", "05", "06"]                        # tiny has a demo section
    assert "04 threshold search" in text and "oof_score 0.8123, empty_baseline 0.7500" in text
    assert f"-> {layout.search_dir(cfg) / 'oof_report.md'}" in text
    assert sum("not done" in line for line in lines) == 6


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
