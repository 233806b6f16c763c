"""Stage 01 (DICOM to PNG): outputs, bad files, skip, resume, reruns on new inputs or settings, the script."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pneumoseg import io as pio
from pneumoseg import layout
from pneumoseg.data.dicom import METADATA_KEYS, DicomTags, read_dicom, write_jpeg_dicom
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import read_png
from pneumoseg.stages import convert

ROOT = Path(__file__).resolve().parents[1]
SIZES = (32, 16)
LAYOUTS = {
    "stage1": lambda i: f"dicom-images-{'test' if i % 3 == 2 else 'train'}/1.2.{i}.1/1.2.{i}.2/1.2.276.{i}.dcm",
    "stage2": lambda i: f"stage_2_images/ID_{i:09x}.dcm",
}


def write_inputs(input_dir: Path, count: int = 5, input_layout: str = "stage1", first: int = 0) -> dict[str, Path]:
    """``count`` small JPEG DICOMs (40 x 36, so every size is a real resize) in a challenge layout."""
    written = {}
    for i in range(first, first + count):
        path = input_dir / LAYOUTS[input_layout](i)
        rows, cols = np.mgrid[0:40, 0:36]
        pixels = (60 + 120 * rows / 40 + 60 * np.sin(cols / 3 + i)).astype(np.uint8)
        write_jpeg_dicom(
            path,
            pixels,
            DicomTags(
                f"1.2.276.{i}",
                f"1.2.{i}.1",
                f"1.2.{i}.2",
                f"patient-{i}",
                sex="MF"[i % 2],
                view_position=("PA", "AP")[i % 2],
            ),
        )
        written[path.stem] = path
    return written


def write_bad_file(input_dir: Path, name: str = "dicom-images-train/9/9/broken.dcm") -> Path:
    path = input_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return path


@pytest.fixture
def make_cfg(tiny_cfg):
    """The tiny config, converting in this process at two sizes; extra ``key=value`` overrides."""
    return lambda *overrides: tiny_cfg("prepare.n_jobs=1", f"prepare.sizes={list(SIZES)}", *overrides)


def stage_files(cfg) -> dict[str, int]:
    """Every file the stage wrote, with its modification time in ns."""
    folder = layout.convert_dir(cfg)
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def pngs(cfg, size: int) -> list[str]:
    return sorted(path.stem for path in layout.images_dir(cfg, size).glob("*.png"))


@pytest.mark.parametrize("input_layout", sorted(LAYOUTS))
def test_stage_writes_pngs_metadata_and_errors(make_cfg, input_layout):
    cfg = make_cfg()
    inputs = write_inputs(Path(cfg.paths.input_dir), input_layout=input_layout)
    bad = write_bad_file(Path(cfg.paths.input_dir))

    summary = convert.run(cfg)

    assert summary == {"images": 5, "converted": 5, "reused": 0, "failed": 1, "sizes": list(SIZES)}
    for size in SIZES:
        assert pngs(cfg, size) == sorted(inputs)
        for image_id, path in inputs.items():
            expected = cv2.resize(read_dicom(path)[0], (size, size), interpolation=cv2.INTER_AREA)
            assert (read_png(layout.images_dir(cfg, size) / f"{image_id}.png") == expected).all()
    folder = layout.convert_dir(cfg)
    metadata = pd.read_csv(folder / "metadata.csv", dtype={"ImageId": str})
    assert tuple(metadata.columns) == METADATA_KEYS
    assert metadata.ImageId.tolist() == sorted(inputs)
    assert metadata.source_path.tolist() == [str(inputs[image_id]) for image_id in sorted(inputs)]
    assert set(metadata.sex) == {"M", "F"} and set(metadata.view) == {"PA", "AP"}
    assert (metadata.age == 50).all() and (metadata.rows == 40).all() and (metadata.cols == 36).all()
    errors = pd.read_csv(folder / "errors.csv")
    assert errors.path.tolist() == [str(bad)]
    assert "DICM" in errors.reason[0]
    done = json.loads((folder / "done.json").read_text())
    assert done["summary"] == summary
    assert json.loads((layout.images_dir(cfg, 16) / "resize.json").read_text())["interpolation"] == "area"


def test_a_complete_stage_is_skipped(make_cfg, monkeypatch):
    cfg = make_cfg()
    write_inputs(Path(cfg.paths.input_dir))
    summary = convert.run(cfg)
    before = stage_files(cfg)
    monkeypatch.setattr(convert, "_convert_all", lambda *args, **kwargs: pytest.fail("converted again"))
    assert convert.run(cfg) == summary
    assert stage_files(cfg) == before


def test_a_killed_run_resumes_without_redoing_finished_images(make_cfg):
    cfg = make_cfg()
    inputs = write_inputs(Path(cfg.paths.input_dir))
    convert.run(cfg)
    metadata = (layout.convert_dir(cfg) / "metadata.csv").read_text()
    # A kill before the end: no done.json, and some images have not all their PNGs yet.
    (layout.convert_dir(cfg) / "done.json").unlink()
    lost = sorted(inputs)[:2]
    (layout.images_dir(cfg, SIZES[0]) / f"{lost[0]}.png").unlink()
    (layout.images_dir(cfg, SIZES[1]) / f"{lost[1]}.png").unlink()
    kept = layout.images_dir(cfg, SIZES[0]) / f"{sorted(inputs)[3]}.png"
    kept_mtime = kept.stat().st_mtime_ns

    summary = convert.run(cfg)

    assert (summary["converted"], summary["reused"], summary["images"]) == (2, 3, 5)
    assert all(pngs(cfg, size) == sorted(inputs) for size in SIZES)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert (layout.convert_dir(cfg) / "done.json").is_file()
    assert (layout.convert_dir(cfg) / "metadata.csv").read_text() == metadata  # header-only rows are the same


def test_added_dicoms_make_the_stage_run_again(make_cfg):
    cfg = make_cfg()
    inputs = write_inputs(Path(cfg.paths.input_dir))
    convert.run(cfg)
    inputs |= write_inputs(Path(cfg.paths.input_dir), count=1, first=5)

    summary = convert.run(cfg)

    assert (summary["converted"], summary["reused"]) == (1, 5)
    assert pngs(cfg, SIZES[1]) == sorted(inputs)


def test_new_resize_settings_rewrite_the_pngs(make_cfg):
    cfg = make_cfg()
    inputs = write_inputs(Path(cfg.paths.input_dir), count=2)
    convert.run(cfg)
    cfg = make_cfg("prepare.interpolation=nearest")

    summary = convert.run(cfg)

    assert summary["converted"] == 2
    image_id, path = next(iter(inputs.items()))
    expected = cv2.resize(read_dicom(path)[0], (16, 16), interpolation=cv2.INTER_NEAREST)
    assert (read_png(layout.images_dir(cfg, 16) / f"{image_id}.png") == expected).all()
    assert json.loads((layout.images_dir(cfg, 16) / "resize.json").read_text())["interpolation"] == "nearest"


def test_a_png_folder_without_its_settings_file_is_not_trusted(make_cfg):
    cfg = make_cfg()
    write_inputs(Path(cfg.paths.input_dir), count=2)
    convert.run(cfg)
    (layout.images_dir(cfg, 16) / "resize.json").unlink()
    (layout.convert_dir(cfg) / "done.json").unlink()

    summary = convert.run(cfg)

    assert (summary["converted"], summary["reused"]) == (2, 0)
    assert (layout.images_dir(cfg, 16) / "resize.json").is_file()


def test_force_rewrites_every_png(make_cfg):
    cfg = make_cfg()
    write_inputs(Path(cfg.paths.input_dir), count=2)
    convert.run(cfg)
    assert convert.run(cfg, force=True)["converted"] == 2


def test_parallel_run_gives_the_same_outputs(make_cfg):
    serial, parallel = make_cfg(), make_cfg("prepare.n_jobs=2", "data.name=parallel")
    write_inputs(Path(serial.paths.input_dir), count=6)
    convert.run(serial)
    assert convert.run(parallel)["converted"] == 6
    for size in SIZES:
        for image_id in pngs(serial, size):
            assert (
                read_png(layout.images_dir(serial, size) / f"{image_id}.png")
                == read_png(layout.images_dir(parallel, size) / f"{image_id}.png")
            ).all()
    assert (layout.convert_dir(serial) / "metadata.csv").read_text() == (
        layout.convert_dir(parallel) / "metadata.csv"
    ).read_text()


def test_missing_input_folder_says_where_to_put_the_files(make_cfg):
    cfg = make_cfg()
    with pytest.raises(DataError, match="does not exist.*stage_2_images.*00_make_demo_data"):
        convert.run(cfg)


def test_input_folder_without_dicoms(make_cfg):
    cfg = make_cfg()
    Path(cfg.paths.input_dir).mkdir(parents=True)
    with pytest.raises(DataError, match="no .dcm files"):
        convert.run(cfg)


def test_nothing_readable_fails_the_stage_after_listing_the_reasons(make_cfg):
    cfg = make_cfg()
    bad = write_bad_file(Path(cfg.paths.input_dir))
    with pytest.raises(DataError, match="none of the 1 DICOM files"):
        convert.run(cfg)
    folder = layout.convert_dir(cfg)
    assert pd.read_csv(folder / "errors.csv").path.tolist() == [str(bad)]
    assert not (folder / "done.json").exists()


def test_strict_fails_on_one_bad_file(make_cfg):
    cfg = make_cfg("prepare.strict=true")
    write_inputs(Path(cfg.paths.input_dir), count=2)
    bad = write_bad_file(Path(cfg.paths.input_dir))
    with pytest.raises(DataError, match=f"1 of 3 DICOM files could not be read.*{bad}"):
        convert.run(cfg)
    assert not (layout.convert_dir(cfg) / "done.json").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("prepare.sizes=[]", "prepare.sizes"),
        ("prepare.sizes=[0]", "prepare.sizes"),
        ("prepare.sizes=64", "prepare.sizes"),
        ("prepare.interpolation=bicubic", "area, linear, cubic"),
        ("prepare.n_jobs=0", "prepare.n_jobs"),
    ],
)
def test_bad_prepare_settings(make_cfg, override, message):
    cfg = make_cfg(override)
    write_inputs(Path(cfg.paths.input_dir), count=1)
    with pytest.raises(ConfigError, match=message):
        convert.run(cfg)


def test_script_reports_a_missing_input_folder_and_exits_1(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "01_convert_dicoms.py"),
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            f"paths.input_dir={tmp_path / 'nowhere'}",
            f"paths.output_root={tmp_path / 'output'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Hostile file systems (issue 25): links, names in any bytes, short writes, a full disk, untrustworthy PNGs


def test_broken_and_looping_links_are_errors_rows(make_cfg):
    cfg = make_cfg()
    inputs = write_inputs(Path(cfg.paths.input_dir), count=2)
    folder = Path(cfg.paths.input_dir) / "dicom-images-train" / "links"
    folder.mkdir()
    (folder / "dangling.dcm").symlink_to(folder / "nowhere.dcm")
    (folder / "loop.dcm").symlink_to(folder / "loop.dcm")

    summary = convert.run(cfg)

    assert (summary["images"], summary["failed"]) == (len(inputs), 2)
    errors = pd.read_csv(layout.convert_dir(cfg) / "errors.csv")
    assert errors.kind.tolist() == ["UnreadableDicomError"] * 2
    assert errors.reason.tolist() == ["No such file or directory", "Too many levels of symbolic links"]


def test_a_file_name_in_any_bytes_is_converted(make_cfg):
    cfg = make_cfg()
    write_inputs(Path(cfg.paths.input_dir), count=1)
    name = os.fsdecode(b"ID_\xff\xfe-caf\xc3\xa9.dcm")  # two bytes that are not UTF-8, then UTF-8 "é"
    folder = Path(cfg.paths.input_dir) / "stage_2_images"
    folder.mkdir()
    write_jpeg_dicom(folder / name, np.full((40, 36), 90, np.uint8), DicomTags("1.2.9", "1.2.9.1", "1.2.9.2", "p"))

    summary = convert.run(cfg)

    assert (summary["converted"], summary["failed"]) == (2, 0)
    image_id = "ID_\\xff\\xfe-café"
    metadata = pd.read_csv(layout.metadata_path(cfg), dtype={"ImageId": str})
    assert image_id in metadata.ImageId.tolist()
    assert (read_png(layout.images_dir(cfg, 16) / f"{image_id}.png") == 90).all()


def test_a_write_that_stores_fewer_bytes_fails_before_the_rename(make_cfg, monkeypatch):
    cfg = make_cfg()
    write_inputs(Path(cfg.paths.input_dir), count=2)
    real_fsync = os.fsync
    # A file system that drops the file's end without an error, as OpenCV's imwrite met on a full disk.
    monkeypatch.setattr(os, "fsync", lambda fd: (os.ftruncate(fd, 8), real_fsync(fd)))
    with pytest.raises(
        DataError,
        match=f"stopped: the disk holding {layout.convert_dir(cfg)} is full \\(could not "
        f"write .*png: 8 of its \\d+ bytes were stored",
    ):
        convert.run(cfg)
    assert not [path for size in SIZES for path in layout.images_dir(cfg, size).iterdir() if path.suffix == ".png"]


class FullDisk:
    """``open`` for pneumoseg.io whose PNG files take ``room`` bytes in all, then fail with ENOSPC as a full disk
    does (after storing what still fits)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def open(self, file, mode="r", **kwargs):
        handle = open(file, mode, **kwargs)  # noqa: SIM115 (closed by its caller, as open's are)
        return FullDiskFile(handle, self) if "w" in mode and str(file).endswith(".png") else handle


class FullDiskFile:
    def __init__(self, handle, disk: FullDisk) -> None:
        self.handle, self.disk = handle, disk

    def write(self, data):
        if len(data) > self.disk.room:
            self.handle.write(data[: self.disk.room])
            self.disk.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def output_files(cfg) -> dict[str, bytes]:
    """Every file stage 01 wrote but its record (times, the config), with its bytes."""
    folder = layout.convert_dir(cfg)
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in ("done.json", "config.yaml")
    }


def test_a_full_disk_ends_the_stage_and_a_rerun_gives_a_clean_runs_outputs(make_cfg, monkeypatch):
    clean, full = make_cfg("data.name=clean"), make_cfg()
    write_inputs(Path(full.paths.input_dir), count=6)
    write_bad_file(Path(full.paths.input_dir))
    convert.run(clean)
    png_bytes = max(len(data) for name, data in output_files(clean).items() if name.endswith(".png"))
    monkeypatch.setattr(pio, "open", FullDisk(room=5 * png_bytes).open, raising=False)

    with pytest.raises(DataError) as caught:
        convert.run(full)

    assert str(caught.value).startswith(
        f"{convert.STAGE_NAME} stopped: the disk holding {layout.convert_dir(full)} "
        f"is full ([Errno {errno.ENOSPC}] No space left on device)"
    )
    written = output_files(full)
    pngs_written = [name for name in written if name.endswith(".png")]
    assert 0 < len(pngs_written) < 12
    assert all(written[name] == output_files(clean)[name] for name in pngs_written)  # whole, or not there
    assert not (layout.convert_dir(full) / "done.json").exists()

    monkeypatch.undo()  # space freed
    summary = convert.run(full)
    assert summary["reused"] > 0 and summary["images"] == 6
    assert output_files(full) == output_files(clean)


def test_resume_redoes_zero_byte_cut_and_foreign_pngs(make_cfg):
    cfg = make_cfg()
    write_inputs(Path(cfg.paths.input_dir), count=4)
    convert.run(cfg)
    expected = output_files(cfg)
    (layout.convert_dir(cfg) / "done.json").unlink()
    zero, cut, foreign = sorted(layout.images_dir(cfg, SIZES[0]).glob("*.png"))[:3]
    zero.write_bytes(b"")
    cut.write_bytes(cut.read_bytes()[:-20])
    cv2.imwrite(str(foreign), np.zeros((SIZES[1], SIZES[1]), np.uint8))  # a whole PNG of the wrong size

    summary = convert.run(cfg)

    assert (summary["converted"], summary["reused"]) == (3, 1)
    assert output_files(cfg) == expected
