"""Crafted files from outside, second round: a SageMaker job's completion record and checkpoint tables, archives
that inflate far past their size, package manifests with settings of the wrong type or range, and the extraction
folders of killed servers."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pneumoseg.errors import DataError
from pneumoseg.modeling.checkpoints import MAX_TABLE_BYTES, best_files
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


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[1, 2]", "not stage 03's completion record"),
    (b'"fingerprint"', "not stage 03's completion record"),
    (b'{"fingerprint": 5}', "fingerprint is not of the type"),
    (b'{"fingerprint": "x", "sections": "train"}', "sections is not of the type"),
    (b'{"fingerprint": "x", "sections": [1]}', "sections is not of the type"),
    (b'{"fingerprint": "x", "summary": [], "inputs": 3}', "inputs, summary are not of the type"),
    (b" " * (2 << 20) + b"{}", "more than the"),
], ids=["json", "utf8", "list", "string", "fingerprint", "sections", "section names", "summary", "size"])
def test_a_crafted_done_json_is_a_data_error_naming_it(tiny_cfg, tmp_path, content, message):
    output = _tar_gz(tmp_path / "output.tar.gz", {"03_train/done.json": content})
    model = _tar_gz(tmp_path / "model.tar.gz", {"fold0/checkpoints.csv": b"rank,file\n1,best_1.pt\n"})
    with pytest.raises(DataError, match=message) as caught:
        import_job.run(tiny_cfg(), model, output)
    assert "done.json" in str(caught.value) and str(output) in str(caught.value)


@pytest.mark.parametrize("content, message", [
    (b"", "not a checkpoint table"),
    (b"\xff\xfe\x00r", "not a checkpoint table"),
    (b"file\nbest_1.pt\n", "not a checkpoint table"),
    (b"rank,file\nfirst,best_1.pt\n", "not a checkpoint table"),
    (b"rank,file\n1,../../etc/passwd\n", "not best_<rank>.pt files"),
    (b"rank,file\n1,\n", "not best_<rank>.pt files"),
    (b"rank,file\n" + b"1,best_1.pt\n" * (MAX_TABLE_BYTES // 12 + 1), "more than the"),
], ids=["empty", "utf16", "no rank", "rank words", "path", "no file", "size"])
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
