"""Stage 02 on a tiny fake stage-01 folder: a few PNGs and a metadata.csv written by the tests themselves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoseg.data import rle
from pneumoseg.data.resize import resize_mask
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import read_png, write_png
from pneumoseg.stages import prepare_labels

ORIGINAL = 128  # the fake DICOMs' size
SIZES = (64, 32)


@dataclass
class FakeData:
    """What a test wrote, so that it can check the stage's outputs against it."""

    input_dir: Path
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # every labelled image with an image
    instances: dict[str, int] = field(default_factory=dict)
    test_ids: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


def image_id(kind: str, index: int) -> str:
    return f"1.2.276.0.7230010.3.1.4.{kind}.{index}"


def make_data(
    cfg,
    n_train=16,
    n_test=4,
    positive_every=2,
    n_unlabelled=1,
    n_orphans=1,
    sample_submission=True,
    seed=0,
    tags=True,
    images_per_patient=1,
) -> FakeData:
    """Write the input label files and stage 01's folder for ``cfg``.

    Every ``positive_every``-th training image (none for 0) has a mask: one rectangle, or two overlapping ones on every
    second positive. Test images live in ``dicom-images-test``; ``n_unlabelled`` training-folder images have no
    label row and ``n_orphans`` label rows have no image. Without ``tags`` the sex, age and view are empty. Each
    run of ``images_per_patient`` consecutive images shares a PatientID.
    """
    rng = np.random.default_rng(seed)
    data = FakeData(input_dir=Path(cfg.paths.input_dir))
    convert_dir = Path(cfg.paths.prepared_dir) / "01_convert"
    lines = ["ImageId, EncodedPixels"]
    meta = []

    def add_image(ident: str, folder: str, sex: str) -> None:
        meta.append(
            {
                "ImageId": ident,
                "source_path": str(data.input_dir / folder / "1.2" / f"{ident}.dcm"),
                "rows": ORIGINAL,
                "cols": ORIGINAL,
                "sex": sex,
                "age": int(rng.integers(20, 80)),
                "view": "PA" if len(meta) % 3 else "AP",
                "pixel_spacing": 0.168,
                "photometric": "MONOCHROME2",
                "transfer_syntax": "1.2.840.10008.1.2.4.50",
                "PatientID": f"P{len(meta) // images_per_patient}",
                "StudyInstanceUID": f"{ident}.2",
                "SeriesInstanceUID": f"{ident}.3",
            }
        )
        for size in SIZES:
            write_png(
                convert_dir / f"images_{size}" / f"{ident}.png", rng.integers(0, 255, (size, size), dtype=np.uint8)
            )

    for index in range(n_train):
        ident = image_id("1", index)
        mask = np.zeros((ORIGINAL, ORIGINAL), dtype=bool)
        rows = []
        if positive_every and index % positive_every == 0:
            top, left = rng.integers(0, ORIGINAL - 60, size=2)
            height, width = rng.integers(8, 60, size=2)
            boxes = [(top, left, height, width)]
            if index % (2 * positive_every) == 0:
                boxes.append((top + height // 2, left + width // 2, height, width))  # overlaps the first
            for y, x, h, w in boxes:
                instance = np.zeros_like(mask)
                instance[y : y + h, x : x + w] = True
                mask |= instance
                rows.append(rle.encode(instance))
        else:
            rows.append(rle.EMPTY)
        data.masks[ident] = mask
        data.instances[ident] = 0 if rows == [rle.EMPTY] else len(rows)
        lines += [f"{ident}, {text}" for text in rows]
        add_image(ident, "dicom-images-train", "M" if index % 2 else "F")
    for index in range(n_unlabelled):
        data.unlabelled.append(image_id("2", index))
        add_image(data.unlabelled[-1], "dicom-images-train", "F")
    for index in range(n_orphans):
        data.orphans.append(image_id("3", index))
        lines.append(f"{data.orphans[-1]}, -1")
    for index in range(n_test):
        data.test_ids.append(image_id("4", index))
        add_image(data.test_ids[-1], "dicom-images-test", "M")
    # Label rows of one image are not adjacent in the real file either.
    lines = [lines[0], *rng.permutation(lines[1:])]
    data.input_dir.mkdir(parents=True, exist_ok=True)
    (data.input_dir / "train-rle.csv").write_text("\n".join(lines) + "\n")
    if sample_submission:
        data.test_ids = list(rng.permutation(data.test_ids))
        (data.input_dir / "sample_submission.csv").write_text(
            "ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in data.test_ids)
        )
    meta = pd.DataFrame(meta)
    if not tags:
        meta[["sex", "age", "view"]] = None
    meta.to_csv(convert_dir / "metadata.csv", index=False)
    return data


@pytest.fixture
def cfg_for(tiny_cfg, monkeypatch):
    """A factory of tiny configs writing masks at SIZES; the data report (about a second of plotting) is left
    out unless ``report=True``."""

    def make(*overrides: str, report: bool = False):
        if not report:
            monkeypatch.setattr(prepare_labels.data_report, "write_report", lambda *args, **kwargs: None)
        return tiny_cfg(f"prepare.sizes=[{SIZES[0]},{SIZES[1]}]", "prepare.n_jobs=1", *overrides)

    return make


def outputs(cfg) -> Path:
    return Path(cfg.paths.prepared_dir) / "02_labels"


def read(cfg, name: str) -> pd.DataFrame:
    return pd.read_csv(outputs(cfg) / name, dtype={"ImageId": str})


def test_stage_writes_masks_tables_and_report(cfg_for):
    cfg = cfg_for(report=True)
    data = make_data(cfg)
    summary = prepare_labels.run(cfg)
    folder = outputs(cfg)

    labels = read(cfg, "labels.csv").set_index("ImageId")
    assert list(labels.columns) == ["has_mask", "n_instances", "mask_area", "rows", "cols"]
    assert set(labels.index) == set(data.masks)
    for ident, mask in data.masks.items():
        assert labels.loc[ident, "mask_area"] == mask.sum()
        assert labels.loc[ident, "has_mask"] == mask.any()
        assert labels.loc[ident, "n_instances"] == data.instances[ident]
        for size in SIZES:
            stored = read_png(folder / f"masks_{size}" / f"{ident}.png")
            assert (stored == resize_mask(mask, size)).all()  # the union, in the right orientation

    test = read(cfg, "test_images.csv")
    assert list(test.columns) == ["ImageId", "rows", "cols"]
    assert test["ImageId"].tolist() == data.test_ids  # the sample submission's order
    unmatched = read(cfg, "unmatched.csv")
    assert sorted(zip(unmatched["ImageId"], unmatched["reason"])) == sorted(
        [(i, prepare_labels.NO_LABEL) for i in data.unlabelled] + [(i, prepare_labels.NO_IMAGE) for i in data.orphans]
    )
    folds = read(cfg, "folds.csv")
    assert list(folds.columns) == ["ImageId", "fold", "has_mask", "area_bin", "group"]  # PatientID by default
    assert sorted(folds["ImageId"]) == sorted(data.masks) and set(folds["fold"]) == {0, 1}

    assert summary["train_images"] == len(data.masks) and summary["test_images"] == len(data.test_ids)
    assert summary["unmatched"] == {prepare_labels.NO_LABEL: 1, prepare_labels.NO_IMAGE: 1}
    assert json.loads((folder / "done.json").read_text())["summary"] == summary
    report = (folder / "data_report.md").read_text()
    for figure in ("positives", "mask_area", "mean_mask", "fold_balance", "patients", "gallery"):
        assert f"](report/{figure}.png)" in report
        assert read_png(folder / "report" / f"{figure}.png").shape[0] > 100


def test_report_without_positives_or_patient_tags(cfg_for):
    cfg = cfg_for(report=True)
    make_data(cfg, positive_every=0, tags=False)
    prepare_labels.run(cfg, force=True)
    report = (outputs(cfg) / "data_report.md").read_text()
    assert "No training image has a mask." in report and "found no sex, age or view tags" in report
    assert "](report/gallery.png)" in report and "mean_mask.png" not in report


def test_test_images_come_from_test_folders_without_a_sample_submission(cfg_for):
    cfg = cfg_for()
    data = make_data(cfg, sample_submission=False)
    prepare_labels.run(cfg)
    assert read(cfg, "test_images.csv")["ImageId"].tolist() == data.test_ids


def test_sample_submission_rows_without_an_image_are_listed(cfg_for):
    cfg = cfg_for()
    data = make_data(cfg, n_unlabelled=0, n_orphans=0)
    with open(data.input_dir / "sample_submission.csv", "a") as handle:
        handle.write("ID_missing,-1\n")
    prepare_labels.run(cfg)
    unmatched = read(cfg, "unmatched.csv")
    assert unmatched[["ImageId", "reason"]].values.tolist() == [["ID_missing", prepare_labels.SUBMISSION_NO_IMAGE]]


@pytest.mark.parametrize("n_splits", [2, 3, 5])
def test_folds_are_balanced(cfg_for, n_splits):
    cfg = cfg_for(f"folds.n_splits={n_splits}")
    make_data(cfg, n_train=60, positive_every=3, seed=n_splits)
    summary = prepare_labels.run(cfg)
    folds = read(cfg, "folds.csv")
    sizes = folds.groupby("fold").size()
    positives = folds.groupby("fold")["has_mask"].sum()
    assert len(sizes) == n_splits and sizes.max() - sizes.min() <= 1
    assert positives.max() - positives.min() <= 1
    balance = pd.DataFrame(summary["fold_balance"])
    assert balance["fold"].tolist() == [*range(n_splits), "all"]
    assert balance.iloc[-1]["positive"] == 20


def test_folds_are_deterministic_for_a_seed(cfg_for):
    cfg = cfg_for()
    make_data(cfg, n_train=40)
    prepare_labels.run(cfg)
    first = read(cfg, "folds.csv")
    prepare_labels.run(cfg, force=True)
    assert read(cfg, "folds.csv").equals(first)
    prepare_labels.run(cfg_for("folds.seed=7"))
    assert not read(cfg, "folds.csv")["fold"].equals(first["fold"])


def test_grouped_folds_keep_a_patient_together(cfg_for):
    cfg = cfg_for("folds.group_by=PatientID", "folds.n_splits=3", report=True)
    make_data(cfg, n_train=40, images_per_patient=2)
    prepare_labels.run(cfg)
    folds = read(cfg, "folds.csv")
    assert list(folds.columns) == ["ImageId", "fold", "has_mask", "area_bin", "group"]
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert folds["group"].nunique() == 20 and folds["fold"].nunique() == 3
    report = (outputs(cfg) / "data_report.md").read_text()
    assert (
        "40 training images of 20 patients; 20 patients have several images (40 images, at most 2 of one "
        "patient). No patient has images in two folds."
    ) in report


def test_report_says_when_patients_straddle_folds(cfg_for):
    cfg = cfg_for("folds.group_by=null", "folds.n_splits=3", report=True)
    make_data(cfg, n_train=40, images_per_patient=4)
    prepare_labels.run(cfg)
    folds = read(cfg, "folds.csv")
    patient = folds["ImageId"].map(lambda i: int(i.rsplit(".", 1)[1]) // 4)
    straddling = int((folds.groupby(patient)["fold"].nunique() > 1).sum())
    assert straddling > 0  # 10 patients of 4 images in 3 ungrouped folds: some are split
    report = (outputs(cfg) / "data_report.md").read_text()
    assert "40 training images of 10 patients; 10 patients have several images (40 images, at most 4" in report
    assert f"**{straddling} patients have images in more than one fold**" in report


def test_unknown_group_column_is_a_config_error(cfg_for):
    cfg = cfg_for("folds.group_by=patient")
    make_data(cfg)
    with pytest.raises(ConfigError, match="folds.group_by='patient' is not a column .* ImageId, source_path"):
        prepare_labels.run(cfg)


def test_metadata_of_an_older_stage_01_says_rerun_it(cfg_for):
    cfg = cfg_for()
    make_data(cfg)
    path = Path(cfg.paths.prepared_dir) / "01_convert" / "metadata.csv"
    pd.read_csv(path).drop(columns=["PatientID"]).to_csv(path, index=False)
    with pytest.raises(ConfigError, match="'PatientID' .* older stage 01: rerun stage 01 with --force"):
        prepare_labels.run(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("folds.n_splits=1", "n_splits=1 must be at least 2"),
        ("folds.n_splits=50", "at most the 16 groups"),
        ("folds.area_bins=[100,200]", "must start with 0 and increase"),
    ],
)
def test_bad_fold_settings_are_config_errors(cfg_for, override, message):
    cfg = cfg_for(override)
    make_data(cfg)
    with pytest.raises(ConfigError, match=message):
        prepare_labels.run(cfg)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("5 2 1", "odd number"),
        ("5 x", "not an integer"),
        ("-3 2", "negative"),
        (f"{ORIGINAL * ORIGINAL - 1} 5", "beyond the 128x128 image"),
    ],
)
def test_malformed_row_names_the_file_image_and_line(cfg_for, bad, message):
    cfg = cfg_for()
    data = make_data(cfg)
    path = data.input_dir / "train-rle.csv"
    victim = image_id("1", 3)
    with open(path, "a") as handle:
        handle.write(f"{victim}, {bad}\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(DataError, match=rf"train-rle.csv, line {line}, ImageId {victim}: .*{message}"):
        prepare_labels.run(cfg)
    assert not (outputs(cfg) / "masks_64").exists()  # nothing written before every row is checked


def test_missing_inputs_say_what_to_do(cfg_for):
    cfg = cfg_for()
    with pytest.raises(DataError, match="put the challenge's train-rle.csv .* or stage_2_train.csv"):
        prepare_labels.run(cfg)
    make_data(cfg)
    (Path(cfg.paths.prepared_dir) / "01_convert" / "metadata.csv").unlink()
    with pytest.raises(DataError, match="metadata.csv not found: run stage 01 first"):
        prepare_labels.run(cfg)


def test_resume_keeps_finished_masks_and_rewrites_when_labels_change(cfg_for):
    cfg = cfg_for()
    data = make_data(cfg)
    first = prepare_labels.run(cfg)
    assert first["masks_written"] == len(data.masks) and first["masks_kept"] == 0
    folder = outputs(cfg)
    marker = folder / "masks_64" / f"{image_id('1', 1)}.png"
    write_png(marker, np.full((64, 64), 255, np.uint8))  # recognisable if it is kept
    (folder / "masks_32" / f"{image_id('1', 2)}.png").unlink()  # as if interrupted before this one

    assert prepare_labels.run(cfg) == first  # complete: skipped, summary from done.json
    (folder / "done.json").unlink()  # as if the run had been interrupted
    resumed = prepare_labels.run(cfg)
    assert resumed["masks_written"] == 1 and resumed["masks_kept"] == len(data.masks) - 1
    assert read_png(marker).min() == 255

    forced = prepare_labels.run(cfg, force=True)
    assert forced["masks_written"] == len(data.masks) and read_png(marker).max() == 0

    write_png(marker, np.full((64, 64), 255, np.uint8))
    with open(data.input_dir / "train-rle.csv", "a") as handle:  # new labels make every mask stale
        handle.write(f"{data.orphans[0]}, -1\n")
    changed = prepare_labels.run(cfg)
    assert changed["masks_written"] == len(data.masks) and read_png(marker).max() == 0


@pytest.mark.slow
def test_parallel_writing_matches_serial(cfg_for, monkeypatch):
    monkeypatch.setattr(prepare_labels, "CHUNK", 4)  # 16 images: 4 tasks for the workers
    serial = cfg_for()
    make_data(serial)
    prepare_labels.run(serial)
    masks = {path.relative_to(outputs(serial)): path.read_bytes() for path in outputs(serial).glob("masks_*/*.png")}
    assert len(masks) == 16 * len(SIZES)
    summary = prepare_labels.run(cfg_for("prepare.n_jobs=2"), force=True)
    assert summary["masks_written"] == 16
    assert {
        path.relative_to(outputs(serial)): path.read_bytes() for path in outputs(serial).glob("masks_*/*.png")
    } == masks


def test_script_prints_the_fold_table(cfg_for, capsys, monkeypatch):
    import runpy
    import sys

    cfg = cfg_for(report=True)
    make_data(cfg)
    root = Path(__file__).resolve().parents[1]
    args = [
        f"paths.input_dir={cfg.paths.input_dir}",
        f"paths.output_root={cfg.paths.output_root}",
        f"prepare.sizes=[{SIZES[0]},{SIZES[1]}]",
        "prepare.n_jobs=1",
    ]
    monkeypatch.setattr(sys, "argv", ["02_prepare_labels.py", "--config", str(root / "configs/tiny.yaml"), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(root / "scripts" / "02_prepare_labels.py"), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "per-fold balance" in printed and "positive_rate" in printed and "1-2000" in printed
