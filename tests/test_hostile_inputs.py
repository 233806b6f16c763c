"""Untrusted inputs other than DICOMs: temporary files of interrupted writes, corrupt checkpoints, and model
packages built to escape their folder or to smuggle in other weights."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fake_experiment import make_package, write_experiment, write_fake_training
from pneumoseg import io as pio
from pneumoseg import layout
from pneumoseg.errors import DataError
from pneumoseg.modeling.checkpoints import load_checkpoint, save_checkpoint
from pneumoseg.serve import package as package_format
from pneumoseg.serve.archive import extract_archive
from pneumoseg.stages import package as package_stage
from pneumoseg.stages import predict as predict_stage

# ---------------------------------------------------------------------------------------------------------
# Temporary files


@pytest.fixture
def fresh_process(monkeypatch):
    """As if this were a new process: no folder swept yet."""
    monkeypatch.setattr(pio, "_swept", set())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp_file(folder: Path, name: str, host: str, pid: int, age_s: float = 0) -> Path:
    path = folder / f".{name}.tmp-{host}-{pid}-abcd_123.png"
    path.write_bytes(b"half a file")
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_temporary_name_is_recognisable_and_removed_on_failure(tmp_path):
    target = tmp_path / "out" / "image.png"
    pio.write_text(target, "old")
    with pytest.raises(RuntimeError, match="crash"), pio.atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(f".image.png.tmp-{pio._HOST}-{os.getpid()}-") and tmp.suffix == ".png"
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["image.png"]


def test_leftovers_of_dead_writers_are_swept_on_the_next_write(tmp_path, fresh_process):
    folder = tmp_path / "images"
    folder.mkdir()
    dead = _temp_file(folder, "a.png", pio._HOST, _dead_pid())
    old = _temp_file(folder, "b.png", "otherhost", os.getppid(), age_s=pio.STALE_AFTER_S + 60)
    live = _temp_file(folder, "c.png", pio._HOST, os.getppid())
    elsewhere = _temp_file(folder, "d.png", "otherhost", _dead_pid())  # another host's pid says nothing here
    unrelated = folder / ".notes.txt"
    unrelated.write_text("not ours")
    pio.write_text(folder / "e.txt", "new")
    assert not dead.exists() and not old.exists()
    assert live.exists() and elsewhere.exists() and unrelated.exists()
    assert (folder / "e.txt").read_text() == "new"


def test_a_folder_is_swept_once_per_process(tmp_path, fresh_process):
    pio.write_text(tmp_path / "a.txt", "1")
    leftover = _temp_file(tmp_path, "b.png", pio._HOST, _dead_pid())
    pio.write_text(tmp_path / "c.txt", "2")  # a folder of 12,000 PNGs is not listed again for each one
    assert leftover.exists()
    assert pio.sweep_stale_temporaries(tmp_path) == [leftover] and not leftover.exists()


# ---------------------------------------------------------------------------------------------------------
# Model packages


def cve_2025_4517_archive(path: Path, payload: bytes = b"overwritten\n") -> Path:
    """The published symlink-chain exploit of CVE-2025-4517: nested symbolic links make the final link's path
    exceed PATH_MAX, so ``os.path.realpath`` stops expanding it and tarfile's ``data`` filter accepts ``escape``,
    which points one folder above the extraction folder. A hard link through it then lets the archive overwrite
    ``../victim.txt``, and ``escape/created.txt`` creates a file there."""
    component, steps, prefix = "d" * 247, "abcdefghijklmnop", ""
    with tarfile.open(path, mode="w") as tar:

        def add(name: str, kind: bytes, linkname: str = "", data: bytes | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        for step in steps:
            add(os.path.join(prefix, component), tarfile.DIRTYPE)
            add(os.path.join(prefix, step), tarfile.SYMTYPE, component)
            prefix = os.path.join(prefix, component)
        long_link = os.path.join("/".join(steps), "l" * 254)
        add(long_link, tarfile.SYMTYPE, "../" * len(steps))
        add("escape", tarfile.SYMTYPE, long_link + "/../")
        add("victimlink", tarfile.LNKTYPE, "escape/victim.txt")
        add("victimlink", tarfile.REGTYPE, data=payload)
        add("escape/created.txt", tarfile.REGTYPE, data=payload)
    return path


def test_cve_2025_4517_archive_is_refused_and_writes_nothing_outside(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"  # open_package extracts into a temporary folder under it
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    victim = scratch / "victim.txt"
    victim.write_text("original\n")
    archive = cve_2025_4517_archive(tmp_path / "model.tar.gz")
    with pytest.raises(DataError, match="symbolic link") as caught, package_format.open_package(archive):
        pass
    assert str(archive) in str(caught.value)
    assert victim.read_text() == "original\n"
    assert sorted(p.name for p in scratch.iterdir()) == ["victim.txt"]  # nothing created, extraction folder gone


def _tar(path: Path, *members: tuple[str, bytes, str, int]) -> Path:
    """A tar of ``(name, type, linkname, size)`` members; regular files hold ``size`` zero bytes."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, linkname, size in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, linkname, size if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(bytes(info.size)) if kind == tarfile.REGTYPE else None)
    return path


FILE = ("manifest.json", tarfile.REGTYPE, "", 10)
HOSTILE_ARCHIVES = {
    "absolute": ([FILE, ("/tmp/evil.py", tarfile.REGTYPE, "", 4)], "not a plain relative path"),
    "dotdot": ([FILE, ("code/../../evil.py", tarfile.REGTYPE, "", 4)], "not a plain relative path"),
    "dot": ([FILE, ("./code/evil.py", tarfile.REGTYPE, "", 4)], "not a plain relative path"),
    "double_slash": ([FILE, ("code//evil.py", tarfile.REGTYPE, "", 4)], "not a plain relative path"),
    "backslash": ([FILE, ("code\\..\\evil.py", tarfile.REGTYPE, "", 4)], "not a plain relative path"),
    "symlink": ([FILE, ("fold0", tarfile.SYMTYPE, "/etc", 0)], "symbolic link"),
    "inner_symlink": ([FILE, ("code/link.py", tarfile.SYMTYPE, "inference.py", 0)], "symbolic link"),
    "hardlink": ([FILE, ("weights.pt", tarfile.LNKTYPE, "manifest.json", 0)], "hard link"),
    "device": ([FILE, ("dev", tarfile.CHRTYPE, "", 0)], "device file"),
    "fifo": ([FILE, ("pipe", tarfile.FIFOTYPE, "", 0)], "FIFO"),
    "duplicate": ([FILE, FILE], "appears twice"),
    "file_as_folder": ([FILE, ("manifest.json/x.py", tarfile.REGTYPE, "", 4)], "under a file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARCHIVES))
def test_hostile_archive_is_refused_before_anything_is_written(tmp_path, case):
    members, message = HOSTILE_ARCHIVES[case]
    archive = _tar(tmp_path / "model.tar.gz", *members)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(DataError, match=message) as caught:
        extract_archive(archive, folder)
    assert str(archive) in str(caught.value)
    assert not list(folder.iterdir())


def test_archive_over_its_member_count_or_size_is_refused(tmp_path):
    archive = _tar(tmp_path / "model.tar.gz", *[(f"f{i}", tarfile.REGTYPE, "", 100) for i in range(5)])
    with pytest.raises(DataError, match="more than 4 entries"):
        extract_archive(archive, tmp_path, max_members=4)
    with pytest.raises(DataError, match="more than 399 bytes"):
        extract_archive(archive, tmp_path, max_bytes=399)
    out = tmp_path / "out"
    out.mkdir()
    extract_archive(archive, out, max_members=5, max_bytes=500)
    assert sorted(p.name for p in out.iterdir()) == [f"f{i}" for i in range(5)]


def test_truncated_archive_is_a_data_error(tmp_path):
    archive = _tar(tmp_path / "model.tar.gz", ("big", tarfile.REGTYPE, "", 1 << 20))
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DataError, match="cannot extract model package"):
        extract_archive(archive, tmp_path)


@pytest.fixture(scope="module")
def package_folder(tmp_path_factory):
    """A real model package of the tiny config, extracted once: ``(cfg, folder)``."""
    root = tmp_path_factory.mktemp("package")
    cfg, archive = make_package(root)
    folder = root / "extracted"
    with package_format.open_package(archive) as extracted:
        shutil.copytree(extracted, folder)
    return cfg, folder


@pytest.fixture
def package_copy(package_folder, tmp_path):
    """A copy of the extracted package to damage, and its manifest."""
    folder = tmp_path / "package"
    shutil.copytree(package_folder[1], folder)
    return folder, json.loads((folder / "manifest.json").read_text())


def _rewrite_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.pt", "fold0/../../outside.pt", "fold0//best_1.pt"])
def test_manifest_file_outside_the_package_is_refused(package_copy, name):
    folder, manifest = package_copy
    shutil.copy(folder / "fold0" / "best_1.pt", folder.parent / "outside.pt")
    manifest["models"][0]["file"] = name
    _rewrite_manifest(folder, manifest)
    with pytest.raises(DataError, match="not a plain relative path"):
        package_format.load_package(folder, device="cpu")


def test_model_file_reached_through_a_symbolic_link_is_refused(package_copy):
    folder, _ = package_copy
    outside = folder.parent / "elsewhere"
    shutil.move(folder / "fold0", outside)
    (folder / "fold0").symlink_to(outside)  # same bytes, same sha256: only the link gives it away
    with pytest.raises(DataError, match="is a symbolic link"):
        package_format.load_package(folder, device="cpu")


def test_model_file_not_matching_its_sha256_is_refused(package_copy):
    folder, _ = package_copy
    weights = folder / "fold1" / "best_1.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its sha256") as caught:
        package_format.load_package(folder, device="cpu")
    assert str(weights) in str(caught.value) and "rebuild it" in str(caught.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["models"][0].pop("sha256"), "lacks a file name or a sha256"),
        (lambda m: m.pop("tta"), "lacks tta"),
        (lambda m: m.update(models=[]), "non-empty list of models"),
    ],
)
def test_incomplete_manifest_is_a_data_error(package_copy, change, message):
    folder, manifest = package_copy
    change(manifest)
    _rewrite_manifest(folder, manifest)
    with pytest.raises(DataError, match=message):
        package_format.load_package(folder, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_checkpoint_is_a_data_error_naming_the_file_and_fold(tmp_path, damage):
    path = tmp_path / "fold3" / "best_1.pt"
    save_checkpoint(path, {"state_dict": {"w": torch.zeros(1000)}, "epoch": 1})
    if damage == "truncate":
        _truncate(path)
    else:
        path.write_bytes(b"" if damage == "empty" else b"PK\x03\x04 not a checkpoint")
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "truncated or corrupt" in message and "--fold 3" in message


def test_truncated_checkpoint_in_a_package_names_the_file_and_the_rebuild(package_copy):
    folder, manifest = package_copy
    weights = folder / "fold0" / "best_1.pt"
    _truncate(weights)
    manifest["models"][0]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # a consistent, bad package
    _rewrite_manifest(folder, manifest)
    with pytest.raises(DataError, match="truncated or corrupt") as caught:
        package_format.load_package(folder, device="cpu")
    assert str(weights) in str(caught.value) and "06_package_model.py" in str(caught.value)


@pytest.mark.parametrize("stage", ["predict", "package"])
def test_truncated_checkpoint_stops_stages_05_and_06_with_a_data_error(tiny_cfg, stage):
    cfg = tiny_cfg("postprocess.source=config")
    if stage == "predict":
        write_experiment(cfg, n_test=2)
    else:
        write_fake_training(cfg)
    weights = layout.fold_dir(cfg, 1) / "best_1.pt"
    _truncate(weights)
    with pytest.raises(DataError, match="truncated or corrupt") as caught:
        (predict_stage if stage == "predict" else package_stage).run(cfg)
    assert str(weights) in str(caught.value) and "--fold 1" in str(caught.value)
