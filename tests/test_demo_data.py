"""Stage 00: the demo dataset's files have the real challenge's exact form, are deterministic, and the stage
skips, regenerates and resumes as a stage should."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from omegaconf import OmegaConf

from pneumoseg import cli
from pneumoseg.data.dicom import UID_ROOT, read_dicom
from pneumoseg.data.rle import decode, encode
from pneumoseg.demo.layouts import patient_visits
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.stages import demo_data

# Small and fast: 16 images of 128 px, of which 7 are positive (3 with several instances).
SMALL = ("demo.n_train=12", "demo.n_test=4", "demo.image_size=128", "demo.n_jobs=1")
UID = re.compile(rf"^{re.escape(UID_ROOT)}\.1\.(?P<kind>[234])\.8323329\.(?P<n>\d+)\.(?P<t>\d+)\.(?P<r>\d+)$")


def _run(tiny_cfg, *overrides: str, force: bool = False) -> tuple[dict, Path]:
    cfg = tiny_cfg(*SMALL, *overrides)
    return demo_data.run(cfg, force=force), Path(cfg.paths.input_dir)


def _files(folder: Path) -> dict[str, bytes]:
    """Every data file of the demo by relative path (the stage records, which hold paths and times, left out)."""
    skip = {"config.yaml", "done.json"}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def _labels(path: Path) -> pd.DataFrame:
    """A label table with column names and values stripped, as the pipeline reads it."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    return frame.apply(lambda column: column.str.strip())


def test_stage1_layout_and_label_table_bytes(tiny_cfg):
    summary, folder = _run(tiny_cfg, "demo.positive_rate=0.6")
    train = sorted((folder / "dicom-images-train").glob("*/*/*.dcm"))
    test = sorted((folder / "dicom-images-test").glob("*/*/*.dcm"))
    assert len(train) == 12 and len(test) == 4
    for path in train + test:
        study, series = path.parent.parent.name, path.parent.name
        assert [UID.match(u)["kind"] for u in (study, series, path.stem)] == ["2", "3", "4"]
        assert int(UID.match(study)["r"]) == int(UID.match(path.stem)["r"]) - 1

    for name, n_images in (("train-rle.csv", 12), ("test_labels.csv", 4)):
        text = (folder / name).read_bytes()
        assert text.startswith(b"ImageId, EncodedPixels\n")
        lines = text.decode().splitlines()[1:]
        assert all(re.fullmatch(r"[\d.]+, (-1|\d+( \d+)*)", line) for line in lines)
        assert len({line.split(",")[0] for line in lines}) == n_images
    raw = pd.read_csv(folder / "train-rle.csv", dtype=str)
    assert list(raw.columns) == ["ImageId", " EncodedPixels"]
    assert raw[" EncodedPixels"].str.startswith(" ").all()
    assert set(raw.ImageId) == {p.stem for p in train}
    assert summary["train"]["images"] == 12 and summary["test"]["images"] == 4


def test_one_row_per_instance_with_multi_overlapping_and_scattered_rows(tiny_cfg):
    summary, folder = _run(tiny_cfg, "demo.n_train=30", "demo.positive_rate=0.5")
    labels = _labels(folder / "train-rle.csv")
    positive = labels[labels.EncodedPixels != "-1"]
    assert len(positive) == summary["train"]["instances"]
    assert labels.ImageId.nunique() == 30 and summary["train"]["positive"] == 15
    assert (labels.EncodedPixels == "-1").sum() == 15
    # no image has both a -1 row and instance rows
    assert not set(positive.ImageId) & set(labels.ImageId[labels.EncodedPixels == "-1"])

    rows_per_image = positive.groupby("ImageId").size()
    assert rows_per_image.max() == 3 and (rows_per_image == 2).any()
    overlapping = 0
    for _, group in positive.groupby("ImageId"):
        masks = [decode(rle, 128, 128) for rle in group.EncodedPixels]
        assert all(m.any() and encode(m) == rle for m, rle in zip(masks, group.EncodedPixels))
        overlapping += any((a & b).any() for k, a in enumerate(masks) for b in masks[k + 1 :])
    assert overlapping >= 1

    positions = labels.groupby("ImageId").indices
    scattered = [i for i, rows in positions.items() if len(rows) > 1 and np.ptp(rows) >= len(rows)]
    assert scattered, "the rows of some multi-instance image should not be adjacent"


def test_dicom_tags_follow_the_challenge(tiny_cfg, monkeypatch):
    # The challenge's bare-number ages are not valid DICOM AS values; pydicom would log each one.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    _, folder = _run(tiny_cfg)
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.SOPInstanceUID == path.stem
        assert ds.StudyInstanceUID == path.parent.parent.name and ds.SeriesInstanceUID == path.parent.name
        assert ds.Modality == "CR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (128, 128, 8)
        assert ds.PatientSex in ("M", "F") and ds.ViewPosition in ("PA", "AP")
        assert re.fullmatch(r"\d{1,3}", str(ds.PatientAge))
        assert 0.139 <= float(ds.PixelSpacing[0]) <= 0.194
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", ds.PatientID)
        pixels, meta = read_dicom(path)
        assert pixels.shape == (128, 128) and meta["ImageId"] == path.stem


def test_patient_visits_give_some_patients_two_or_three_images():
    visits = patient_visits(seed=3, split=0, n_images=400, follow_up_rate=0.15)
    assert visits == patient_visits(seed=3, split=0, n_images=400, follow_up_rate=0.15)
    per_patient = pd.Series([patient for patient, _ in visits]).value_counts()
    assert per_patient.max() == 3 and set(per_patient.unique()) == {1, 2, 3}
    assert 0.10 < (per_patient > 1).mean() < 0.20
    for index, (patient, visit) in enumerate(visits):  # named by its first image, visits counted in order
        assert patient <= index and (visit == 0) == (patient == index)
    assert patient_visits(3, 0, 50, 0.0) == [(k, 0) for k in range(50)]


def test_follow_ups_share_the_patient_but_not_the_study(tiny_cfg, monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    summary, folder = _run(tiny_cfg, "demo.follow_up_rate=0.6")
    headers = pd.DataFrame(
        [
            {
                key: str(getattr(ds, key))
                for key in ("PatientID", "PatientSex", "PatientAge", "StudyInstanceUID", "SeriesInstanceUID")
            }
            for ds in map(pydicom.dcmread, sorted(folder.glob("dicom-images-train/*/*/*.dcm")))
        ]
    )
    per_patient = headers.groupby("PatientID")
    assert summary["train"]["patients"] == len(per_patient) < 12
    assert per_patient["PatientSex"].nunique().max() == 1
    ages = per_patient["PatientAge"].agg(lambda a: a.astype(int).max() - a.astype(int).min())
    assert ages.max() <= 2 and (per_patient.size() > 1).any()
    assert headers["StudyInstanceUID"].is_unique and headers["SeriesInstanceUID"].is_unique


def test_positive_rate_is_exact_in_each_split(tiny_cfg):
    summary, folder = _run(tiny_cfg, "demo.n_train=20", "demo.n_test=10", "demo.positive_rate=0.3")
    assert summary["train"]["positive"] == 6 and summary["test"]["positive"] == 3
    test = _labels(folder / "test_labels.csv")
    assert test.ImageId.nunique() == 10 and test[test.EncodedPixels != "-1"].ImageId.nunique() == 3


def test_same_seed_same_bytes_in_parallel_and_different_seed_differs(tiny_cfg, tmp_path):
    _, serial = _run(tiny_cfg)
    parallel = tmp_path / "parallel"
    _run(tiny_cfg, f"paths.input_dir={parallel}", "demo.n_jobs=2")
    # The manifest holds the config's fingerprint, of which n_jobs is a part; the data are the same.
    first, second = _files(serial), _files(parallel)
    assert first.pop(demo_data.MANIFEST) != second.pop(demo_data.MANIFEST) and first == second
    other = tmp_path / "other"
    _run(tiny_cfg, f"paths.input_dir={other}", "demo.seed=7")
    second = _files(other)
    assert first["train-rle.csv"] != second["train-rle.csv"]
    assert not set(first) & set(second) - {"train-rle.csv", "test_labels.csv", demo_data.ANNOTATIONS}


def test_stage2_layout(tiny_cfg):
    _, folder = _run(tiny_cfg, "demo.layout=stage2")
    images = sorted((folder / "stage_2_images").iterdir())
    assert len(images) == 16 and all(re.fullmatch(r"ID_[0-9a-f]{9}\.dcm", p.name) for p in images)
    assert not (folder / "dicom-images-train").exists()
    train_text = (folder / "stage_2_train.csv").read_text()
    assert train_text.startswith("ImageId,EncodedPixels\n") and ", " not in train_text
    train, test = _labels(folder / "stage_2_train.csv"), _labels(folder / "test_labels.csv")
    assert (folder / "test_labels.csv").read_text().startswith("ImageId,EncodedPixels\n")
    sample = _labels(folder / "stage_2_sample_submission.csv")
    assert train.ImageId.nunique() == 12 and sorted(sample.ImageId) == sorted(test.ImageId.unique())
    assert (sample.EncodedPixels == "-1").all() and len(sample) == 4
    assert set(train.ImageId) | set(sample.ImageId) == {p.stem for p in images}
    assert pydicom.dcmread(images[0]).SOPInstanceUID.startswith(UID_ROOT)


def test_rerun_with_same_config_is_skipped(tiny_cfg):
    first, folder = _run(tiny_cfg)
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    summary, _ = _run(tiny_cfg)
    assert summary == first
    assert stamps == {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_changed_config_replaces_only_the_demos_own_files(tiny_cfg):
    _, folder = _run(tiny_cfg)
    (folder / "notes.txt").write_text("mine")
    (folder / "dicom-images-train" / "keep").mkdir()
    old = set(_files(folder))
    summary, _ = _run(tiny_cfg, "demo.layout=stage2")
    assert summary["written"] == 16
    now = set(_files(folder))
    assert (folder / "notes.txt").read_text() == "mine"
    # Emptied study and series folders go too; a folder that still holds something of the user's stays.
    assert list((folder / "dicom-images-train").iterdir()) == [folder / "dicom-images-train" / "keep"]
    assert not (folder / "dicom-images-test").exists() and not (folder / "train-rle.csv").exists()
    assert not {name for name in old & now if name.endswith(".dcm")}
    manifest = json.loads((folder / demo_data.MANIFEST).read_text())
    assert set(manifest["files"]) == now - {"notes.txt", demo_data.MANIFEST}


def test_killed_run_resumes_and_matches_a_clean_run(tiny_cfg, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(demo_data, "write_text", crash)
        with pytest.raises(KeyboardInterrupt):
            _run(tiny_cfg)
    cfg = tiny_cfg(*SMALL)
    folder = Path(cfg.paths.input_dir)
    assert not (folder / "done.json").exists() and not (folder / "train-rle.csv").exists()
    summary, _ = _run(tiny_cfg)
    assert summary["reused"] == 16 and summary["written"] == 0
    clean = tmp_path / "clean"
    _run(tiny_cfg, f"paths.input_dir={clean}")
    assert _files(folder) == _files(clean)


def test_force_rewrites_everything(tiny_cfg):
    _run(tiny_cfg)
    summary, _ = _run(tiny_cfg, force=True)
    assert summary["written"] == 16 and summary["reused"] == 0


def test_refuses_to_overwrite_files_it_did_not_write(tiny_cfg):
    cfg = tiny_cfg(*SMALL)
    folder = Path(cfg.paths.input_dir)
    folder.mkdir(parents=True)
    (folder / "train-rle.csv").write_text("real labels")
    with pytest.raises(DataError, match="did not write"):
        demo_data.run(cfg)
    assert (folder / "train-rle.csv").read_text() == "real labels"


@pytest.mark.parametrize(
    "override, message",
    [
        ("demo.layout=stage3", "unknown demo layout"),
        ("demo.positive_rate=1.5", "positive_rate"),
        ("demo.follow_up_rate=-0.1", "follow_up_rate"),
        ("demo.image_size=32", "image_size"),
        ("demo.n_train=0", "n_train"),
    ],
)
def test_bad_demo_config_is_a_config_error(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        demo_data.run(tiny_cfg(override))


def test_without_demo_section_the_script_does_nothing_and_exits_0(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    real = OmegaConf.to_container(cfg)
    del real["demo"]
    config = tmp_path / "real.yaml"
    config.write_text(OmegaConf.to_yaml(real))
    assert demo_data.run(OmegaConf.create(real)) == {"skipped": "no demo section"}
    assert cli.run_stage_script("demo", lambda c, a: demo_data.run(c), argv=["--config", str(config)]) == 0
    assert not Path(cfg.paths.input_dir).exists()
