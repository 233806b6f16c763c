"""Crafted files from outside, second round: a SageMaker job's completion record and checkpoint tables, archives
that inflate far past their size, package manifests with settings of the wrong type or range, and the extraction
folders of killed servers."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fake_experiment import make_package
from pneumoseg import layout
from pneumoseg.errors import DataError
from pneumoseg.modeling.checkpoints import MAX_TABLE_BYTES, best_files
from pneumoseg.serve import package as package_format
from pneumoseg.serve.archive import extract_archive
from pneumoseg.stages import import_job

# ---------------------------------------------------------------------------------------------------------
# A SageMaker job's files


def _tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b"[1, 2]", "not stage 03's completion record"),
        (b'"fingerprint"', "not stage 03's completion record"),
        (b'{"fingerprint": 5}', "fingerprint is not of the type"),
        (b'{"fingerprint": "x", "sections": "train"}', "sections is not of the type"),
        (b'{"fingerprint": "x", "sections": [1]}', "sections is not of the type"),
        (b'{"fingerprint": "x", "summary": [], "inputs": 3}', "inputs, summary are not of the type"),
        (b" " * (2 << 20) + b"{}", "more than the"),
    ],
    ids=["json", "utf8", "list", "string", "fingerprint", "sections", "section names", "summary", "size"],
)
def test_a_crafted_done_json_is_a_data_error_naming_it(tiny_cfg, tmp_path, content, message):
    cfg = tiny_cfg()
    layout.folds_path(cfg).parent.mkdir(parents=True)
    layout.folds_path(cfg).write_text("ImageId,fold\n")  # the prepared data is there: done.json is read
    output = _tar_gz(tmp_path / "output.tar.gz", {"03_train/done.json": content})
    model = _tar_gz(tmp_path / "model.tar.gz", {"fold0/checkpoints.csv": b"rank,file\n1,best_1.pt\n"})
    with pytest.raises(DataError, match=message) as caught:
        import_job.run(cfg, model, output)
    assert "done.json" in str(caught.value) and str(output) in str(caught.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a checkpoint table"),
        (b"\xff\xfe\x00r", "not a checkpoint table"),
        (b"file\nbest_1.pt\n", "not a checkpoint table"),
        (b"rank,file\nfirst,best_1.pt\n", "not a checkpoint table"),
        (b"rank,file\n1,../../etc/passwd\n", "not best_<rank>.pt files"),
        (b"rank,file\n1,\n", "not best_<rank>.pt files"),
        (b"rank,file\n" + b"1,best_1.pt\n" * (MAX_TABLE_BYTES // 12 + 1), "more than the"),
    ],
    ids=["empty", "utf16", "no rank", "rank words", "path", "no file", "size"],
)
def test_a_crafted_checkpoints_csv_is_a_data_error_naming_it(tmp_path, content, message):
    fold = tmp_path / "fold0"
    fold.mkdir()
    (fold / "best_1.pt").write_bytes(b"weights")
    (fold / "checkpoints.csv").write_bytes(content)
    with pytest.raises(DataError, match=message) as caught:
        best_files(fold)
    assert str(fold / "checkpoints.csv") in str(caught.value)


def test_a_good_checkpoints_csv_ranks_the_files(tmp_path):
    for name in ("best_1.pt", "best_2.pt"):
        (tmp_path / name).write_bytes(b"w")
    (tmp_path / "checkpoints.csv").write_text("rank,file,epoch\n2,best_2.pt,3\n1,best_1.pt,5\n")
    assert best_files(tmp_path) == [tmp_path / "best_1.pt", tmp_path / "best_2.pt"]


# ---------------------------------------------------------------------------------------------------------
# Package manifests: the schema of every setting


@pytest.fixture(scope="module")
def package_folder(tmp_path_factory):
    """A real model package of the tiny config, extracted once."""
    root = tmp_path_factory.mktemp("package")
    _, archive = make_package(root)
    folder = root / "extracted"
    with package_format.open_package(archive) as extracted:
        shutil.copytree(extracted, folder)
    return folder


def _damaged(package_folder: Path, tmp_path: Path, change, file: str = "manifest.json") -> Path:
    folder = tmp_path / "package"
    shutil.copytree(package_folder, folder)
    content = json.loads((folder / file).read_text())
    change(content)
    (folder / file).write_text(json.dumps(content))
    return folder


def _set(key: str, value):
    def change(content: dict) -> None:
        *parents, last = key.split(".")
        for parent in parents:
            content = content[parent]
        content[last] = value

    return change


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("batch_size", "abc", "an integer in 1..256"),
        ("batch_size", 0, "an integer in 1..256"),
        ("batch_size", True, "an integer in 1..256"),
        ("batch_size", 10**9, "an integer in 1..256"),
        ("tta", "x", "not null or an object"),
        ("tta", {"hflip": True, "rotate": 90}, "not null or an object"),
        ("tta.scales", [1000], "a list of numbers in 0.25..4"),
        ("tta.scales", [], "a list of 1 to 8 scales"),
        ("tta.scales", [1.0] * 9, "a list of 1 to 8 scales"),
        ("tta.scales", ["1"], "a list of numbers in 0.25..4"),
        ("tta.hflip", "yes", "one of True, False"),
        ("interpolation", "bicubic-ish", "one of 'area'"),
        ("amp", "fp8", "one of None, 'auto'"),
        ("image_size", 10**6, "an integer in 32..4096"),
        ("fmt", "rle", "one of 'relative', 'absolute'"),
        ("name", ["x"], "a string"),
        ("postprocess.params.threshold", "abc", "not a finite number"),
    ],
    ids=lambda value: str(value)[:20],
)
def test_a_manifest_setting_of_the_wrong_type_or_range_is_a_data_error_naming_it(
    package_folder, tmp_path, key, value, expected
):
    folder = _damaged(package_folder, tmp_path, _set(key, value))
    with pytest.raises(DataError, match=re.escape(expected)) as caught:
        package_format.read_manifest(folder)
    assert f"{key} is " in str(caught.value) and "manifest.json" in str(caught.value)


def test_tta_scales_are_bounded_by_the_models_size(package_folder, tmp_path):
    folder = _damaged(package_folder, tmp_path, lambda m: m.update(image_size=2048, tta={"scales": [1.0, 4.0]}))
    with pytest.raises(DataError, match="views over 4096 px"):
        package_format.read_manifest(folder)


def test_the_manifest_is_refused_before_anything_is_built(package_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(package_format, "load_model", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    folder = _damaged(package_folder, tmp_path, _set("tta.scales", [1000]))
    with pytest.raises(DataError, match=r"tta\.scales is \[1000\]"):
        package_format.load_package(folder, device="cpu")


@pytest.mark.parametrize(
    "change, expected",
    [
        (_set("params.threshold", "abc"), 'params.threshold is "abc", not a finite number'),
        (_set("params.threshold", 7.0), "threshold must be a probability"),
        (lambda block: block.pop("name"), "not a {name, params} block"),
    ],
)
def test_a_crafted_thresholds_json_is_a_data_error_naming_it(package_folder, tmp_path, change, expected):
    folder = _damaged(package_folder, tmp_path, change, file="thresholds.json")
    with pytest.raises(DataError, match=re.escape(expected)) as caught:
        package_format.load_package(folder, device="cpu")
    assert "thresholds.json" in str(caught.value)


def test_the_untouched_package_passes_the_schema(package_folder):
    assert package_format.read_manifest(package_folder)["name"] == "tiny"


# ---------------------------------------------------------------------------------------------------------
# Extraction folders of killed servers


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_extraction_folders_of_gone_processes_are_swept_on_the_next_open(package_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"pneumoseg-model-{_dead_pid()}-abc"
    live = [
        tmp_path / f"pneumoseg-model-{os.getpid()}-def",
        tmp_path / f"pneumoseg-model-{os.getppid()}-ghi",
        tmp_path / "pneumoseg-model-nopid",
        tmp_path / "other-folder",
    ]
    for folder in (dead, *live):
        (folder / "fold0").mkdir(parents=True)
        (folder / "fold0" / "best_1.pt").write_bytes(b"weights")
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(package_folder.iterdir()):
            tar.add(entry, arcname=entry.name)
    with package_format.open_package(archive) as extracted:
        assert extracted.name.startswith(f"pneumoseg-model-{os.getpid()}-")  # the owner's id is recorded
        assert not dead.exists() and all(folder.exists() for folder in live)
    assert not extracted.exists()


# ---------------------------------------------------------------------------------------------------------
# Archives that inflate far past their size (a SageMaker job's output.tar.gz, a model package)


def test_an_archive_inflating_a_thousandfold_is_refused_before_a_byte_is_written(tmp_path):
    """A few hundred bytes whose one member claims 2 GiB (a 2.1 MB output.tar.gz wrote a 2 GiB file): refused from
    its header, nothing written."""
    info = tarfile.TarInfo("03_train/log.csv")
    info.size = 2 << 30
    archive = tmp_path / "output.tar.gz"
    with gzip.open(archive, "wb") as out:
        out.write(info.tobuf(tarfile.GNU_FORMAT) + bytes(1 << 16))
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DataError, match="decompression bomb") as caught:
        extract_archive(archive, target)
    assert str(archive) in str(caught.value) and not any(target.iterdir())


def test_an_archive_needing_more_than_the_free_space_is_refused(tmp_path, monkeypatch):
    archive = _tar_gz(tmp_path / "model.tar.gz", {"fold0/best_1.pt": b"w" * 1000})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=999))
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DataError, match="need 1000 bytes, but .* has 999 free"):
        extract_archive(archive, target)
    assert not any(target.iterdir())
