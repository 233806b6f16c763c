"""Untrusted inputs other than DICOMs: temporary files of interrupted writes, corrupt checkpoints, and model
packages built to escape their folder or to smuggle in other weights."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pneumoseg import io as pio
from pneumoseg.errors import DataError


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
    with pytest.raises(RuntimeError, match="crash"):
        with pio.atomic_path(target) as tmp:
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
