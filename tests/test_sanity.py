"""Sanity warnings: scores below the all-empty baseline, no positive prediction; status shows them."""

import pytest

from pneumoseg import layout
from pneumoseg.evaluation import sanity
from pneumoseg.io import write_json
from pneumoseg.stages import status


def test_the_issue_case_warns_in_stage_04_and_05():
    # a 3-epoch demo that predicted nothing: OOF 0.7988, nested 0.7581, test 0.7810, all-empty 0.7792
    search = sanity.search_warnings({"oof_score": 0.7988, "nested_score": 0.7581, "empty_baseline": 0.7792})
    assert len(search) == 1 and "nested estimate 0.7581 is below the all-empty baseline 0.7792" in search[0]
    assert "train.epochs" in search[0]
    predicted = sanity.prediction_warnings(
        {"images": 210, "positive": 0, "test_score": 0.7810, "test_empty_baseline": 0.7810}
    )
    assert len(predicted) == 1 and "no test image of 210 was predicted with pneumothorax" in predicted[0]


@pytest.mark.parametrize(
    "summary, count",
    [
        ({"images": 10, "positive": 3, "test_score": 0.80, "test_empty_baseline": 0.78}, 0),
        ({"images": 10, "positive": 3, "test_score": 0.70, "test_empty_baseline": 0.78}, 1),
        ({"images": 10, "positive": 0, "test_score": 0.70, "test_empty_baseline": 0.78}, 2),
        ({"images": 10, "positive": 3}, 0),  # no test labels: nothing to compare
    ],
)
def test_prediction_warnings(summary, count):
    assert len(sanity.prediction_warnings(summary)) == count


def test_no_warning_at_or_above_the_baseline_or_without_a_nested_estimate():
    assert sanity.search_warnings({"nested_score": 0.7792, "empty_baseline": 0.7792}) == []
    assert sanity.search_warnings({"nested_score": None, "empty_baseline": 0.7792}) == []


def test_the_empty_baseline_of_a_label_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ImageId,EncodedPixels\na,-1\nb,1 2\nb,5 2\nc,-1\nd, -1\n")
    assert sanity.empty_baseline(path) == 0.75


def test_status_shows_a_stages_warnings(tiny_cfg):
    cfg = tiny_cfg()
    write_json(
        layout.search_dir(cfg) / "done.json",
        {
            "finished_at": "t",
            "summary": {
                "oof_score": 0.7988,
                "empty_baseline": 0.7792,
                "nested_score": 0.7581,
                "warnings": ["the nested estimate 0.7581 is below the all-empty baseline 0.7792"],
            },
        },
    )
    assert "WARNING: the nested estimate 0.7581 is below the all-empty baseline 0.7792" in status.report(cfg)
