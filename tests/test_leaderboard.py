"""The leaderboard: on real run folders of the tiny pipeline (two experiments), and its order and refusals."""

import json
import logging

import pytest
import torch

from pneumoseg import layout
from pneumoseg.errors import DataError
from pneumoseg.evaluation import leaderboard
from pneumoseg.io import write_json
from pneumoseg.modeling.checkpoints import best_files
from pneumoseg.modeling.models import build_model
from pneumoseg.stages import convert, demo_data, predict, prepare_labels, search, train


@pytest.mark.slow
def test_the_leaderboard_reads_two_real_experiments(tiny_cfg, tmp_path):
    experiments = {"narrow": [], "wide": ["model.params.decoder_channels=[32, 16, 8]"]}
    configs = {}
    for name, overrides in experiments.items():
        cfg = tiny_cfg(f"experiment={name}", "demo.n_train=16", "demo.n_test=4", "data.image_size=32", *overrides)
        for stage in (demo_data, convert, prepare_labels, train, search, predict):
            stage.run(cfg)
        configs[name] = cfg
    runs = leaderboard.write_leaderboard(tmp_path / "output")

    assert sorted(r.name for r in runs) == ["narrow", "wide"]
    assert runs[0].nested_score >= runs[1].nested_score
    for run in runs:
        cfg = configs[run.name]
        numbers = json.loads(layout.oof_report_path(cfg).read_text())
        assert (run.oof_score, run.nested_score) == (numbers["oof_score"], numbers["nested_score"])
        assert run.fold_scores == [f["nested_score"] for f in numbers["per_fold"]] and len(run.fold_scores) == 2
        scores = json.loads((layout.predict_dir(cfg) / predict.TEST_SCORE_FILE).read_text())
        assert run.test_score == scores["test_score"]
        folds = json.loads((layout.train_dir(cfg) / "done.json").read_text())["summary"]["fold_summaries"]
        assert run.train_seconds == pytest.approx(sum(f["seconds"] for f in folds.values()))
        net = build_model(cfg.model, pretrained=False)
        assert run.parameters == sum(p.numel() for p in net.parameters())
        files = [path for k in (0, 1) for path in best_files(layout.fold_dir(cfg, k))[:2]]  # predict.top_k: 2
        assert run.checkpoint_bytes == sum(p.stat().st_size for p in files)
    assert runs[0].parameters != runs[1].parameters
    table = (tmp_path / "output" / "leaderboard.md").read_text()
    assert table.index(f"| 1 | {runs[0].name}") < table.index(f"| 2 | {runs[1].name}")
    assert "![nested score per run](leaderboard.png)" in table
    assert (tmp_path / "output" / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def _fake_run(root, name, nested, oof, per_fold=(0.5, 0.7), empty=None):
    folds = [{"fold": k, "score": s, "nested_score": None if nested is None else s} for k, s in enumerate(per_fold)]
    summary = {
        "oof_score": oof,
        "nested_score": nested,
        "per_fold": folds,
        "chosen": {"name": "threshold", "params": {"threshold": 0.5, "min_area": 400}},
    }
    write_json(
        root / name / "04_search" / "done.json",
        {"summary": summary | ({} if empty is None else {"empty_baseline": empty})},
    )


def test_runs_are_sorted_by_nested_score_and_unreadable_ones_are_left_out(tmp_path, caplog):
    _fake_run(tmp_path, "a", nested=0.80, oof=0.90)
    _fake_run(tmp_path, "b", nested=0.85, oof=0.86)
    _fake_run(tmp_path, "single_fold", nested=None, oof=0.99)
    (tmp_path / "broken" / "04_search").mkdir(parents=True)
    (tmp_path / "broken" / "04_search" / "done.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        runs = leaderboard.collect(tmp_path)
    assert [r.name for r in runs] == ["b", "a", "single_fold"]
    assert "broken" in caplog.text and "not valid JSON" in caplog.text
    assert runs[0].spread == pytest.approx(torch.tensor([0.5, 0.7]).std().item())
    assert runs[0].test_score is None and runs[0].parameters is None  # no stage 05, no checkpoints
    assert (
        "| 1 | b | 0.8500 | 0.8600 | 0.1414 [0.5000, 0.7000] | n/a | n/a | threshold (min_area 400, threshold "
        "0.5) |" in leaderboard.markdown(runs)
    )


def test_a_missing_output_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        leaderboard.write_leaderboard(tmp_path / "nowhere")


def test_a_run_with_an_unreadable_config_is_left_out(tmp_path, caplog):
    _fake_run(tmp_path, "good", nested=0.8, oof=0.9)
    _fake_run(tmp_path, "bad_config", nested=0.8, oof=0.9)
    (tmp_path / "bad_config" / "03_train").mkdir()
    (tmp_path / "bad_config" / "04_search" / "config.yaml").write_text("predict: [unclosed\n")
    with caplog.at_level(logging.WARNING):
        runs = leaderboard.collect(tmp_path)
    assert [r.name for r in runs] == ["good"] and "bad_config" in caplog.text


def test_the_all_empty_baseline_is_a_column_a_line_and_marks_the_runs_below_it(tmp_path, monkeypatch):
    _fake_run(tmp_path, "learned", nested=0.85, oof=0.86, empty=0.78)
    _fake_run(tmp_path, "nothing", nested=0.7581, oof=0.7988, empty=0.7792)
    runs = leaderboard.collect(tmp_path)
    assert [(r.name, r.below_baseline) for r in runs] == [("learned", False), ("nothing", True)]
    table = leaderboard.markdown(runs)
    assert "| 1 | learned | 0.8500 | 0.8600 | 0.1414 [0.5000, 0.7000] | n/a | 0.7800 |" in table
    assert "| 2 | nothing **below all-empty** | 0.7581 | 0.7988 |" in table and "| 0.7792 |" in table
    figures = []

    class Kept(leaderboard.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(leaderboard, "Figure", Kept)
    leaderboard.plot(runs, tmp_path / "plot.png")
    ax = figures[0].axes[0]
    line = next(c for c in ax.collections if c.get_label() == "all empty")
    # one segment across each run's row (learned at the top, row 1; nothing at row 0), at its baseline
    assert [segment[:, 0].tolist() for segment in line.get_segments()] == [[0.78, 0.78], [0.7792, 0.7792]]
    assert [segment[:, 1].mean() for segment in line.get_segments()] == pytest.approx([1, 0])
    assert sorted(t.get_text() for t in ax.get_yticklabels()) == ["learned", "nothing (below all-empty)"]
