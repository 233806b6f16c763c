"""Fuzzed DICOMs (seeded mutations of valid files: bit flips, truncations, corrupted VRs, huge lengths, wrong
transfer syntaxes) through the one reader, the handler's ``input_fn`` and stage 01: every outcome is an image
or the project's own error, never another exception, and stage 01 lists the bad files and finishes the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import JPEG2000Lossless

import hostile
from clinical import codestream_claiming, progressive_jpeg_dicom
from pneumoseg import layout
from pneumoseg.data.dicom import DicomError, read_dicom_bytes
from pneumoseg.serve import handler
from pneumoseg.stages import convert
from test_convert import write_inputs

SEED = 20261201
VALID = {
    "jpeg": hostile.jpeg_dicom(),
    "deflated_12bit": hostile.deflated_dicom(hostile.small_image().astype(np.uint16) * 16),
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_fuzzed_dicoms_decode_or_raise_a_dicom_error(kind):
    outcomes = {"image": 0, "error": 0}
    for name, data in hostile.mutants(VALID[kind], 200, SEED):
        try:
            pixels, _ = read_dicom_bytes(data, name=name)
        except DicomError as exc:
            assert exc.path == name and exc.reason
            outcomes["error"] += 1
        else:
            assert pixels.dtype == np.uint8 and pixels.ndim == 2
            outcomes["image"] += 1
    assert outcomes["error"] > 50  # the mutations do damage; some leave a readable image


def test_fuzzed_dicoms_through_the_handler_are_images_or_400s():
    for _, data in hostile.mutants(VALID["jpeg"], 100, SEED + 1):
        try:
            decoded = handler.input_fn(data, "application/dicom")
        except handler.BadRequest as exc:
            assert exc.status == 400 and ("cannot read DICOM" in str(exc) or "not a readable" in str(exc))
        else:
            assert decoded.pixels.dtype == np.uint8


@pytest.mark.parametrize(
    "data, reason",
    [
        (hostile.rle_bomb(), "larger than any radiograph"),
        (hostile.deflate_bomb(), "inflates to more than"),
        (hostile.jpeg_frame_bomb(), "its codestream declares 20000x20000"),
        (hostile.corrupt_vr(hostile.jpeg_dicom()), "Unknown Value Representation"),
    ],
    ids=["rle_bomb", "deflate_bomb", "jpeg_bomb", "corrupt_vr"],
)
def test_bombs_through_the_handler_are_400s(data, reason):
    with pytest.raises(handler.BadRequest, match=reason) as caught:
        handler.input_fn(data, "application/dicom")
    assert caught.value.status == 400


@pytest.mark.parametrize("strict", [False, True])
def test_stage_01_lists_fuzzed_and_hostile_files_and_finishes_the_rest(tiny_cfg, strict):
    cfg = tiny_cfg("prepare.n_jobs=1", "prepare.sizes=[32]", f"prepare.strict={str(strict).lower()}")
    input_dir = Path(cfg.paths.input_dir)
    good = write_inputs(input_dir, count=3)
    hostile_files = {
        "rle_bomb": hostile.rle_bomb(),
        "jpeg_bomb": hostile.jpeg_frame_bomb(),
        "corrupt_vr": hostile.corrupt_vr(hostile.jpeg_dicom()),
        "deflate_bomb": hostile.deflate_bomb(),
        "scan_bomb": progressive_jpeg_dicom(hostile.small_image(), extra_scans=100),
        "j2k_bomb": codestream_claiming(JPEG2000Lossless, 13000, 13000),
    }
    hostile_files.update((f"fuzz{name}", data) for name, data in hostile.mutants(VALID["jpeg"], 12, SEED + 2))
    readable = set()
    for name, data in hostile_files.items():
        path = input_dir / "dicom-images-train" / "9" / "9" / f"{name}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        try:
            read_dicom_bytes(data)
            readable.add(path.stem)
        except DicomError:
            pass
    bad = len(hostile_files) - len(readable)
    if strict:
        with pytest.raises(convert.DataError, match=f"{bad} of {len(good) + len(hostile_files)} DICOM files"):
            convert.run(cfg)
        return
    summary = convert.run(cfg)
    assert summary["images"] == len(good) + len(readable) and summary["failed"] == bad
    errors = pd.read_csv(layout.convert_dir(cfg) / "errors.csv")
    assert list(errors.columns) == ["path", "kind", "reason"]
    kinds = dict(zip(errors.path.map(lambda p: Path(p).stem), errors.kind))
    bombs = ("rle_bomb", "deflate_bomb", "jpeg_bomb", "scan_bomb", "j2k_bomb")
    assert {kinds[name] for name in bombs} == {"TooLargeDicomError"}
    assert kinds["corrupt_vr"] == "NotDicomError"
    assert (layout.convert_dir(cfg) / "done.json").is_file()
    assert convert.run(cfg) == summary  # a rerun is skipped, not failed
