"""The ``predict`` command (pneumoseg.inference.folder): a folder of DICOM, PNG and JPEG files in, predictions.csv,
masks, overlays, DICOM SEG, errors.csv and the review page out; scope, resume, and stage 05's masks."""

import csv
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from fake_experiment import make_package, write_fake_training
from pneumoseg import layout
from pneumoseg.data.dicom import DicomTags, write_jpeg_dicom
from pneumoseg.data.rle import decode
from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.submission import read_submission
from pneumoseg.inference import folder
from pneumoseg.inference.dicom_seg import read_segmentation_mask
from pneumoseg.inference.sources import pixel_area_mm2, scope_note
from pneumoseg.io import read_png

SIZE = 80


def _dicom(path: Path, seed: int, **changes) -> Path:
    """A challenge-like DICOM of random texture at ``path``; ``changes`` set header attributes afterwards."""
    rng = np.random.default_rng(seed)
    pixels = cv2.GaussianBlur(rng.integers(0, 256, (SIZE, SIZE + 8), dtype=np.uint8), (0, 0), 3)
    write_jpeg_dicom(
        path,
        pixels,
        DicomTags(
            sop_instance_uid=f"1.2.3.{seed}",
            study_instance_uid=f"1.2.4.{seed}",
            series_instance_uid=f"1.2.5.{seed}",
            patient_id=f"p{seed}",
        ),
    )
    if changes:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A stage-06 package of untrained tiny models (threshold 0.5: irregular, non-empty masks)."""
    _, path = make_package(tmp_path_factory.mktemp("package"))
    return path


@pytest.fixture
def xrays(tmp_path):
    """Three DICOMs (one a lateral view), a PNG and a JPEG in a subfolder, and a broken file."""
    root = tmp_path / "xrays"
    (root / "sub").mkdir(parents=True)
    for seed in (1, 2):
        _dicom(root / f"a{seed}.dcm", seed)
    _dicom(root / "lateral.dcm", 3, ViewPosition="LL")
    rng = np.random.default_rng(4)
    picture = cv2.GaussianBlur(rng.integers(0, 256, (SIZE + 16, SIZE), dtype=np.uint8), (0, 0), 3)
    Image.fromarray(picture).save(root / "sub" / "b.png")
    Image.fromarray(picture).convert("RGB").save(root / "sub" / "c.JPG")
    (root / "sub" / "broken.dcm").write_bytes(b"not a dicom at all")
    (root / "notes.txt").write_text("ignored")
    return root


def _rows(output: Path, name: str = folder.PREDICTIONS_FILE) -> dict[str, dict[str, str]]:
    with open(output / name, newline="") as handle:
        return {row["source"]: row for row in csv.DictReader(handle)}


def _predict(package, xrays, output, *extra) -> int:
    return folder.main(
        [
            "--model",
            str(package),
            "--input",
            str(xrays),
            "--output",
            str(output),
            "--workers",
            "0",
            "--batch-size",
            "2",
            *extra,
        ]
    )


def test_a_folder_gives_rows_masks_overlays_segs_and_a_review_page(package, xrays, tmp_path):
    output = tmp_path / "out"
    assert _predict(package, xrays, output) == 0
    rows = _rows(output)
    assert sorted(rows) == ["a1.dcm", "a2.dcm", "lateral.dcm", "sub/b.png", "sub/c.JPG"]
    assert list(next(iter(rows.values()))) == list(folder.COLUMNS)
    errors = _rows(output, folder.ERRORS_FILE)
    assert list(errors) == ["sub/broken.dcm"] and "broken.dcm" in errors["sub/broken.dcm"]["error"]

    for source in ("a1.dcm", "a2.dcm", "sub/b.png", "sub/c.JPG"):
        row = rows[source]
        mask = read_png(output / "masks" / f"{source}.png") > 0
        shape = (SIZE, SIZE + 8) if source.endswith(".dcm") else (SIZE + 16, SIZE)
        assert mask.shape == shape and mask.any()
        assert np.array_equal(decode(row["EncodedPixels"], *shape), mask)
        assert row["has_pneumothorax"] == "true" and row["in_scope"] == "true"
        assert int(row["area_pixels"]) == mask.sum() and 0 <= float(row["probability"]) <= 1
        overlay = cv2.imread(str(output / "overlays" / f"{source}.jpg"))
        assert overlay.shape[1] == shape[1] and overlay.shape[0] > shape[0]  # the caption bar on top
    dicom = rows["a1.dcm"]
    assert dicom["SOPInstanceUID"] == "1.2.3.1" and dicom["StudyInstanceUID"] == "1.2.4.1"
    assert float(dicom["area_mm2"]) == pytest.approx(int(dicom["area_pixels"]) * 0.168**2, abs=0.06)
    assert rows["sub/b.png"]["SOPInstanceUID"] == "" and rows["sub/b.png"]["area_mm2"] == ""
    assert not (output / "seg" / "sub").exists() and not (output / "probabilities").exists()

    page = (output / "index.html").read_text()
    assert page.count('<img class="thumb"') == 4 and "broken.dcm" in page
    assert page.index("a1.dcm") < page.index("lateral.dcm")  # predicted rows before the out-of-scope one


def test_the_dicom_seg_references_its_source_and_holds_the_mask(package, xrays, tmp_path):
    output = tmp_path / "out"
    assert _predict(package, xrays, output) == 0
    source = pydicom.dcmread(xrays / "a2.dcm")
    path = output / "seg" / "a2.dcm.seg.dcm"
    mask = read_png(output / "masks" / "a2.dcm.png") > 0
    read_back, sop_uid = read_segmentation_mask(path)
    assert sop_uid == source.SOPInstanceUID and np.array_equal(read_back, mask)
    seg = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert np.array_equal(seg.pixel_array.astype(bool), mask)


def test_out_of_scope_dicoms_are_flagged_and_predicted_only_when_asked(package, xrays, tmp_path):
    _dicom(xrays / "knee.dcm", 5, BodyPartExamined="KNEE")
    _dicom(xrays / "mr.dcm", 6, Modality="MR")
    assert _predict(package, xrays, tmp_path / "out") == 0
    rows = _rows(tmp_path / "out")
    for source, reason in [
        ("lateral.dcm", "lateral view (LL)"),
        ("knee.dcm", "body part KNEE"),
        ("mr.dcm", "modality MR"),
    ]:
        assert rows[source]["in_scope"] == "false" and reason in rows[source]["note"]
        assert rows[source]["EncodedPixels"] == "" and not (tmp_path / "out" / "masks" / f"{source}.png").exists()
    assert "out of scope, not predicted" in (tmp_path / "out" / "index.html").read_text()

    assert _predict(package, xrays, tmp_path / "all", "--include-out-of-scope") == 0
    rows = _rows(tmp_path / "all")
    assert rows["knee.dcm"]["in_scope"] == "false" and rows["knee.dcm"]["EncodedPixels"] not in ("", "-1")
    assert (tmp_path / "all" / "masks" / "knee.dcm.png").is_file()


@pytest.mark.parametrize(
    "changes, note",
    [
        ({}, ""),
        ({"Modality": "DX", "BodyPartExamined": "THORAX", "ViewPosition": "AP"}, ""),
        ({"BodyPartExamined": ""}, ""),
        ({"Modality": "CT"}, "modality CT"),
        ({"ViewPosition": "LATERAL"}, "lateral"),
    ],
)
def test_scope_rules(changes, note):
    header = pydicom.Dataset()
    header.Modality, header.BodyPartExamined, header.ViewPosition = "CR", "CHEST", "PA"
    for keyword, value in changes.items():
        setattr(header, keyword, value)
    assert (note in scope_note(header)) and (bool(scope_note(header)) == bool(note))


def test_pixel_area_from_pixel_spacing_else_imager_pixel_spacing():
    header = pydicom.Dataset()
    assert pixel_area_mm2(header) is None
    header.ImagerPixelSpacing = [0.2, 0.1]
    assert pixel_area_mm2(header) == pytest.approx(0.02)
    header.PixelSpacing = [0.15, 0.15]
    assert pixel_area_mm2(header) == pytest.approx(0.0225)


def test_a_killed_run_resumes_and_gives_what_a_clean_run_gives(package, xrays, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert _predict(package, xrays, clean) == 0
    output = tmp_path / "killed"
    original = folder.write_outputs
    written = []

    def dies_on_the_fourth(image, *args):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(image.source)
        return original(image, *args)

    monkeypatch.setattr(folder, "write_outputs", dies_on_the_fourth)
    assert _predict(package, xrays, output) == 130
    # Batches of 2: the first recorded; the second's files written but its rows not yet; the third killed.
    assert list(_rows(output)) == ["a1.dcm", "a2.dcm"]
    with open(output / folder.PREDICTIONS_FILE, "a") as handle:  # a kill in the middle of an append
        handle.write("sub/b.png,,,tr")
    resumed = []
    monkeypatch.setattr(
        folder, "write_outputs", lambda image, *args: resumed.append(image.source) or original(image, *args)
    )
    assert _predict(package, xrays, output) == 0
    assert resumed == ["sub/b.png", "sub/c.JPG"]  # lateral.dcm is out of scope: read, not predicted
    assert _rows(output) == _rows(clean)
    assert (output / folder.PREDICTIONS_FILE).read_text().count("\n") == len(_rows(clean)) + 1
    for name in ("masks", "overlays", "seg"):
        assert sorted(p.relative_to(output) for p in (output / name).rglob("*")) == sorted(
            p.relative_to(clean) for p in (clean / name).rglob("*")
        )


def test_probability_maps_on_request(package, xrays, tmp_path):
    assert _predict(package, xrays, tmp_path / "out", "--probabilities") == 0
    probs = cv2.imread(str(tmp_path / "out" / "probabilities" / "a1.dcm.png"), cv2.IMREAD_UNCHANGED)
    assert probs.dtype == np.uint16 and probs.shape == (SIZE, SIZE + 8)
    row = _rows(tmp_path / "out")["a1.dcm"]
    assert probs.max() / 65535 == pytest.approx(float(row["probability"]), abs=1e-4)


@pytest.mark.slow  # the worker processes import torch: about 15 s
def test_worker_processes_give_the_same_rows(package, xrays, tmp_path):
    assert _predict(package, xrays, tmp_path / "inline") == 0
    assert (
        folder.main(
            [
                "--model",
                str(package),
                "--input",
                str(xrays),
                "--output",
                str(tmp_path / "workers"),
                "--workers",
                "2",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    assert _rows(tmp_path / "workers") == _rows(tmp_path / "inline")


def test_bad_arguments_are_named(package, xrays, tmp_path, caplog):
    assert _predict(package, tmp_path / "nowhere", tmp_path / "out") == 1
    assert "input folder" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(ConfigError, match="is a package"), folder.open_model(package, ["tta.hflip=false"]):
        pass


def test_an_experiment_whose_training_did_not_finish_is_named(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg()
    write_fake_training(cfg)
    done = layout.train_dir(cfg) / "done.json"
    done.unlink()  # a training stopped before its last fold: checkpoints, but no done.json
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    paths = [f"paths.input_dir={cfg.paths.input_dir}", f"paths.output_root={cfg.paths.output_root}"]
    (tmp_path / "xrays").mkdir()
    assert _predict(config, tmp_path / "xrays", tmp_path / "out", *paths) == 1
    assert f"{done} is missing. Run scripts/03_train.py first" in caplog.text and "Traceback" not in caplog.text


@pytest.mark.slow  # stages 00-02 and 05 on the tiny demo: about 20 s
def test_the_demos_test_dicoms_get_exactly_the_masks_of_stage_05(tiny_cfg, tmp_path):
    from pneumoseg.stages import convert, demo_data, predict, prepare_labels

    cfg = tiny_cfg("postprocess.source=search")
    for stage in (demo_data, convert, prepare_labels):
        stage.run(cfg)
    write_fake_training(cfg)
    predict.run(cfg)
    submission = {row.image_id: row.encoded for row in read_submission(layout.submission_path(cfg))[0]}

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert (
        folder.main(
            [
                "--model",
                str(config),
                "--input",
                str(Path(cfg.paths.input_dir) / "dicom-images-test"),
                "--output",
                str(tmp_path / "out"),
                "--workers",
                "0",
                f"paths.input_dir={cfg.paths.input_dir}",
                f"paths.output_root={cfg.paths.output_root}",
                "postprocess.source=search",
            ]
        )
        == 0
    )
    rows = _rows(tmp_path / "out").values()
    assert {row["SOPInstanceUID"]: row["EncodedPixels"] for row in rows} == submission
    assert sum(encoded != "-1" for encoded in submission.values()) >= 2  # masks, not only empty images


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Debian's chromium, headless and offline, on a local page."""
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.mark.slow  # a browser start: a few seconds
def test_the_review_page_renders_with_its_images_in_a_headless_browser(package, xrays, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    assert _predict(package, xrays, tmp_path / "out") == 0
    page = tmp_path / "out" / "index.html"
    dom = _chromium(page, tmp_path / "profile", "--dump-dom").stdout
    assert dom.count('<img class="thumb"') == 4 and dom.count("<tr class=") == 6
    shot = tmp_path / "shot.png"
    _chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1000,1400")
    pixels = cv2.imread(str(shot))
    # The overlays are dark X-rays with a black caption bar; a page whose images failed to load is white with text.
    dark = (pixels.max(axis=2) < 60).sum()
    assert dark > 4 * 200 * 40, f"only {dark} dark pixels: the thumbnails did not render"
