"""The output layout: every path where the stages have always put it, and the choice of folds."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumoseg import layout
from pneumoseg.errors import ConfigError


def test_paths_of_the_config(tiny_cfg):
    cfg = tiny_cfg()
    prepared, experiment = Path(cfg.paths.prepared_dir), Path(cfg.paths.experiment_dir)
    expected = {
        layout.convert_dir(cfg): prepared / "01_convert",
        layout.images_dir(cfg, 64): prepared / "01_convert/images_64",
        layout.metadata_path(cfg): prepared / "01_convert/metadata.csv",
        layout.labels_dir(cfg): prepared / "02_labels",
        layout.masks_dir(cfg, 64): prepared / "02_labels/masks_64",
        layout.labels_path(cfg): prepared / "02_labels/labels.csv",
        layout.test_images_path(cfg): prepared / "02_labels/test_images.csv",
        layout.unmatched_path(cfg): prepared / "02_labels/unmatched.csv",
        layout.folds_path(cfg): prepared / "02_labels/folds.csv",
        layout.train_dir(cfg): experiment / "03_train",
        layout.train_folds_path(cfg): experiment / "03_train/folds.csv",
        layout.fold_dir(cfg, 2): experiment / "03_train/fold2",
        layout.fold_log_path(layout.fold_dir(cfg, 2)): experiment / "03_train/fold2/log.csv",
        layout.oof_dir(layout.fold_dir(cfg, 2)): experiment / "03_train/fold2/oof",
        layout.search_dir(cfg): experiment / "04_search",
        layout.thresholds_path(cfg): experiment / "04_search/thresholds.json",
        layout.oof_report_path(cfg): experiment / "04_search/oof_report.json",
        layout.predict_dir(cfg): experiment / "05_predict",
        layout.submission_path(cfg): experiment / "05_predict/submission.csv",
        layout.package_dir(cfg): experiment / "06_package",
        layout.package_path(cfg): experiment / "06_package/model.tar.gz",
    }
    for found, wanted in expected.items():
        assert found == wanted


def test_folders_instead_of_the_config(tmp_path):
    assert layout.images_dir(tmp_path, 32) == tmp_path / "01_convert/images_32"
    assert layout.folds_path(str(tmp_path)) == tmp_path / "02_labels/folds.csv"
    assert layout.fold_dir(tmp_path, 1) == tmp_path / "fold1"  # a training folder (SageMaker's model dir)
    assert layout.train_folds_path(tmp_path) == tmp_path / "folds.csv"


def test_numbered_folders_are_found_in_number_order(tmp_path):
    for name in ("fold10", "fold2", "fold0", "folder", "fold_x"):
        (tmp_path / name).mkdir()
    (tmp_path / "fold3").write_text("a file, not a fold")
    assert layout.fold_dirs(tmp_path) == {0: tmp_path / "fold0", 2: tmp_path / "fold2", 10: tmp_path / "fold10"}
    for size in (256, 64):
        layout.masks_dir(tmp_path, size).mkdir(parents=True)
    assert list(layout.mask_dirs(tmp_path)) == [64, 256]


@pytest.mark.parametrize(
    "setting, chosen",
    [
        ("all", [0, 1, 2, 3]),
        (None, [0, 1, 2, 3]),
        (2, [2]),
        ("2", [2]),
        ("3,1", [1, 3]),
        ("1,", [1]),
        ([3, 0, 3], [0, 3]),
        (["1", "2"], [1, 2]),
    ],
)
def test_select_folds(setting, chosen):
    assert layout.select_folds(setting, [3, 1, 0, 2], "train.folds", "folds.csv") == chosen


@pytest.mark.parametrize(
    "setting, message",
    [
        ([4], r"--fold names fold\(s\) \[4\], which 03_train/folds.csv does not have \(it has \[0, 1\]\)"),
        ("1,5", r"--fold names fold\(s\) \[5\]"),
        ("x", "--fold must be 'all' or fold numbers, not 'x'"),
        ([0.5, "y"], "--fold must be 'all' or fold numbers"),
    ],
)
def test_select_folds_rejects(setting, message):
    with pytest.raises(ConfigError, match=message):
        layout.select_folds(setting, [0, 1], "--fold", Path("03_train/folds.csv"))
