import json
import os

import numpy as np
import pandas as pd
import pytest

from fake_experiment import write_experiment
from pneumoseg import layout
from pneumoseg.data.labels import read_labels
from pneumoseg.data.rle import decode
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.evaluation.submission import read_submission, validate_submission
from pneumoseg.inference.predictor import Predictor
from pneumoseg.io import read_png
from pneumoseg.stages import predict as stage

ORIGINAL = 96


def _done(cfg):
    return json.loads((layout.predict_dir(cfg) / "done.json").read_text())


@pytest.fixture
def experiment(tiny_cfg):
    """A synthetic experiment for stage 05 and a factory of its configs (post-processing from the config)."""

    def make(*overrides):
        return tiny_cfg("postprocess.source=config", *overrides)

    return make, write_experiment(make(), n_test=6, per_fold=2, original_size=ORIGINAL)


def _expected_dice(cfg, test, predicted_all: bool) -> float:
    """The test score of a submission predicting every pixel (or none) of every image."""
    labels = read_labels(stage.test_labels_path(cfg))
    dice = []
    for image_id in test["ImageId"]:
        area = labels[image_id].mask(ORIGINAL, ORIGINAL).sum()
        dice.append(2 * area / (area + ORIGINAL**2) if predicted_all else float(area == 0))
    return float(np.mean(dice))


@pytest.mark.parametrize("threshold, predicted_all", [(0.0, True), (1.0, False)])
def test_writes_a_valid_submission_and_scores_it_on_the_held_out_labels(experiment, threshold, predicted_all):
    make, test = experiment
    cfg = make(f"postprocess.params.threshold={threshold}")
    summary = stage.run(cfg)

    path = layout.submission_path(cfg)
    sizes = {i: (ORIGINAL, ORIGINAL) for i in test["ImageId"]}
    assert validate_submission(path, test["ImageId"].tolist(), sizes) == []
    rows, _ = read_submission(path)
    assert [r.image_id for r in rows] == test["ImageId"].tolist()
    masks = [decode(r.encoded, ORIGINAL, ORIGINAL) for r in rows]
    assert all(m.all() if predicted_all else not m.any() for m in masks)

    assert summary["images"] == len(test) and summary["positive"] == (len(test) if predicted_all else 0)
    assert summary["models"] == 2 * int(cfg.folds.n_splits) and summary["views_per_model"] == 2
    expected = _expected_dice(cfg, test, predicted_all)
    assert summary["test_score"] == pytest.approx(expected, abs=1e-4) and summary["oof_score"] == 0.75
    scores = json.loads((layout.predict_dir(cfg) / stage.TEST_SCORE_FILE).read_text())
    assert scores["test_score"] == pytest.approx(expected, abs=1e-4)
    assert (layout.predict_dir(cfg) / "config.yaml").is_file() and _done(cfg)["summary"] == summary
    assert "test score" in stage.summary_text(summary)
    # The detector report: every image called positive (or none), each with its image-level score.
    image_scores = pd.read_csv(layout.predict_dir(cfg) / stage.IMAGE_SCORES_FILE)
    assert len(image_scores) == len(test) and image_scores["positive"].all() == predicted_all
    assert (summary["test_sensitivity"], summary["test_specificity"]) == ((1.0, 0.0) if predicted_all else (0.0, 1.0))
    assert "## As a detector" in (layout.predict_dir(cfg) / stage.TEST_REPORT_MD).read_text()


def test_predictions_match_the_predictor_and_stream_in_batches(experiment, monkeypatch):
    make, test = experiment
    cfg = make("predict.batch_size=4", "postprocess.params.threshold=0.5")
    seen = []
    original = Predictor.predict_prepared

    def spy(self, images, shapes):
        seen.append(len(images))
        return original(self, images, shapes)

    monkeypatch.setattr(Predictor, "predict_prepared", spy)
    stage.run(cfg)
    assert seen == [4, 2]
    rows, _ = read_submission(layout.submission_path(cfg))
    predictor = Predictor.from_experiment(cfg)
    folder = layout.images_dir(cfg, predictor.image_size)
    images = np.stack([read_png(folder / f"{i}.png") for i in test["ImageId"]])
    direct = original(predictor, images, [(ORIGINAL, ORIGINAL)] * len(test))
    assert [r.encoded for r in rows] == [p.rle() for p in direct]


def test_absolute_form(experiment):
    make, test = experiment
    relative = make("postprocess.params.threshold=0.5")
    stage.run(relative)
    masks = [decode(r.encoded, ORIGINAL, ORIGINAL) for r in read_submission(layout.submission_path(relative))[0]]
    absolute = make("postprocess.params.threshold=0.5", "predict.fmt=absolute")
    stage.run(absolute)
    rows, _ = read_submission(layout.submission_path(absolute))
    assert all(np.array_equal(decode(r.encoded, ORIGINAL, ORIGINAL, "absolute"), m) for r, m in zip(rows, masks))
    with pytest.raises(ConfigError, match="predict.fmt"):
        stage.run(make("predict.fmt=kaggle"))


def test_skipped_when_complete_and_rerun_when_an_input_changes(experiment):
    make, _ = experiment
    cfg = make()
    stage.run(cfg)
    first = _done(cfg)["finished_at"], layout.submission_path(cfg).stat().st_mtime_ns
    stage.run(cfg)
    assert (_done(cfg)["finished_at"], layout.submission_path(cfg).stat().st_mtime_ns) == first

    checkpoint = next(layout.fold_dir(cfg, 0).glob("best_1.pt"))
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    stage.run(cfg)
    assert layout.submission_path(cfg).stat().st_mtime_ns != first[1]
    changed_tta = make("tta.hflip=false")
    assert stage.run(changed_tta)["views_per_model"] == 1


def test_missing_inputs_are_data_errors(experiment, tiny_cfg):
    make, test = experiment
    cfg = make()
    (layout.train_dir(cfg) / "done.json").unlink()
    with pytest.raises(DataError, match="stage 03 has not finished"):
        stage.run(cfg)
    with pytest.raises(DataError, match="test_images.csv not found"):
        stage.run(tiny_cfg("paths.prepared_dir=/nonexistent"))


def test_sample_submission_images_must_all_be_test_images(experiment):
    make, test = experiment
    cfg = make()
    sample = pd.DataFrame({"ImageId": [*test["ImageId"], "1.2.3.unknown"], "EncodedPixels": "-1"})
    sample.to_csv(os.path.join(cfg.paths.input_dir, "stage_2_sample_submission.csv"), index=False)
    with pytest.raises(DataError, match="1 ImageIds of the sample submission .*1.2.3.unknown"):
        stage.run(cfg)
