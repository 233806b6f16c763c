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
