"""Stage 06: the model package's layout and contents, its reproducibility and staleness, and that it loads and
predicts with nothing beside it, with its own bundled code."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fake_experiment import THRESHOLDS, make_package, write_fake_training
from pneumoseg.config import to_dict
from pneumoseg.errors import DataError
from pneumoseg.inference import runtime
from pneumoseg.inference.predictor import Predictor
from pneumoseg.serve import handler as serving
from pneumoseg.serve import package as package_format
from pneumoseg.stages import package
from sagemaker_container import CONTAINER, normalise, required_names, with_dependencies

IMAGE = np.random.default_rng(3).integers(0, 256, (80, 60), dtype=np.uint8)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("package"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_package_layout(packaged):
    cfg, path = packaged
    with tarfile.open(path) as archive:
        names = archive.getnames()
        files = {
            name: archive.extractfile(name).read()
            for name in (
                "manifest.json",
                "thresholds.json",
                "config.yaml",
                "code/inference.py",
                "code/requirements.txt",
            )
        }
        assert all(member.isfile() and member.mode == 0o644 and member.mtime == 0 for member in archive)
    manifest, thresholds = json.loads(files["manifest.json"]), json.loads(files["thresholds.json"])
    config = yaml.safe_load(files["config.yaml"])
    entry_point, requirements = files["code/inference.py"].decode(), files["code/requirements.txt"].decode()
    assert names == sorted(names)
    assert {
        "manifest.json",
        "thresholds.json",
        "config.yaml",
        "fold0/best_1.pt",
        "fold1/best_1.pt",
        "code/inference.py",
        "code/requirements.txt",
        "code/pneumoseg/__init__.py",
        "code/pneumoseg/serve/handler.py",
    } <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert manifest["format"] == package_format.PACKAGE_FORMAT and manifest["name"] == "tiny"
    assert manifest["version"].startswith("tiny-") and len(manifest["version"]) == len("tiny-") + 12
    assert [m["file"] for m in manifest["models"]] == ["fold0/best_1.pt", "fold1/best_1.pt"]
    assert manifest["tta"] == {"hflip": True, "vflip": False, "scales": [1.0]}
    assert (manifest["image_size"], manifest["interpolation"], manifest["fmt"]) == (64, "area", "relative")
    assert thresholds == manifest["postprocess"] == THRESHOLDS
    assert config["experiment"] == "tiny" and config["model"] == to_dict(cfg.model)
    assert "from pneumoseg.serve.handler import model_fn, transform_fn" in entry_point
    assert requirements == package_format.requirements_text()
    assert json.loads((path.parent / "manifest.json").read_text()) == manifest
    with tarfile.open(path) as archive:  # each checkpoint's ONNX export beside it, with its sha256
        for entry in manifest["models"]:
            onnx = entry["onnx"]
            assert onnx["file"] == entry["file"].replace(".pt", ".onnx")
            assert hashlib.sha256(archive.extractfile(onnx["file"]).read()).hexdigest() == onnx["sha256"]
    check = manifest["onnx_check"]
    assert check["images"] >= 1 and check["max_probability_difference"] < 1e-4
    assert check["mask_share_differing"] == 0 and check["dice_between_runtimes"] == 1


def test_weights_are_plain_state_dicts(packaged, tmp_path):
    with tarfile.open(packaged[1]) as archive:
        archive.extractall(tmp_path, filter="data")
    for name in ("fold0/best_1.pt", "fold1/best_1.pt"):
        checkpoint = torch.load(tmp_path / name, map_location="cpu", weights_only=True)  # refuses pickled code
        assert all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
        assert sha256(tmp_path / name) == next(
            m["sha256"] for m in json.loads((tmp_path / "manifest.json").read_text())["models"] if m["file"] == name
        )


def test_package_loads_and_predicts_with_nothing_beside_it(packaged, tmp_path):
    cfg, path = packaged
    [expected] = Predictor.from_experiment(cfg, device="cpu").predict([IMAGE])
    copy = tmp_path / "model.tar.gz"
    shutil.copy(path, copy)
    experiment = Path(cfg.paths.experiment_dir)
    hidden = experiment.with_name("hidden")
    experiment.rename(hidden)  # no training outputs anywhere while the copy loads
    try:
        with package_format.open_package(copy) as model_dir:
            model = package_format.load_package(model_dir, device="cpu", runtime="torch")
            onnx_model = package_format.load_package(model_dir, device="cpu")  # auto: ONNX Runtime on the CPU
    finally:
        hidden.rename(experiment)
    [found] = model.predictor.predict([IMAGE])
    np.testing.assert_array_equal(found.probs, expected.probs)
    np.testing.assert_array_equal(found.mask, expected.mask)
    assert (model.runtime, onnx_model.runtime) == ("torch", "onnxruntime")
    [found] = onnx_model.predictor.predict([IMAGE])
    np.testing.assert_allclose(found.probs, expected.probs, atol=1e-5)
    np.testing.assert_array_equal(found.mask, expected.mask)


@pytest.mark.slow
def test_package_is_reproducible_skipped_when_complete_and_rebuilt_when_weights_change(tmp_path):
    cfg, path = make_package(tmp_path)
    first = sha256(path)
    done = (path.parent / "done.json").read_text()
    package.run(cfg)
    assert (path.parent / "done.json").read_text() == done, "a complete package is skipped"
    package.run(cfg, force=True)
    assert sha256(path) == first, "the same inputs give the same bytes"
    write_fake_training(cfg, seed=1)
    summary = package.run(cfg)
    assert sha256(path) != first
    assert summary["version"] != json.loads(done)["summary"]["version"]


def test_a_corrupt_onnx_file_in_a_package_is_a_data_error_naming_it(packaged, tmp_path):
    with tarfile.open(packaged[1]) as archive:
        archive.extractall(tmp_path, filter="data")
    onnx = tmp_path / "fold1" / "best_1.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{onnx} does not match its sha256"):
        package_format.load_package(tmp_path, device="cpu")
    assert package_format.load_package(tmp_path, device="cpu", runtime="torch").runtime == "torch"


def test_a_package_without_onnx_files_predicts_with_torch_and_says_so(packaged, tmp_path, caplog):
    with tarfile.open(packaged[1]) as archive:
        archive.extractall(tmp_path, filter="data")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["models"]:  # as stage 06 wrote packages before it exported ONNX models
        (tmp_path / entry.pop("onnx")["file"]).unlink()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("INFO", logger=runtime.__name__):
        assert package_format.load_package(tmp_path, device="cpu").runtime == "torch"
    assert [r.getMessage() for r in caplog.records if "torch predicts" in r.getMessage()] != []


def test_a_package_whose_onnx_export_disagrees_with_torch_is_refused(tmp_path, monkeypatch):
    def export_with_sigmoid(net, image_size, channels, path):  # probabilities where logits belong
        runtime.export_onnx(torch.nn.Sequential(net, torch.nn.Sigmoid()), image_size, channels, path)

    monkeypatch.setattr(package, "export_onnx", export_with_sigmoid)
    with pytest.raises(DataError, match="is not the ONNX export of the checkpoint"):
        make_package(tmp_path)
    assert not list((tmp_path / "output").rglob("model.tar.gz"))


def test_package_needs_finished_training(tiny_cfg):
    with pytest.raises(DataError, match="03_train.py"):
        package.run(tiny_cfg())


@pytest.mark.slow
def test_entry_point_runs_on_the_bundled_code_alone(packaged, tmp_path):
    """As SageMaker's container runs it: code/ first on the path, ``inference`` imported, its ``model_fn`` and
    ``transform_fn`` called; the bundled pneumoseg is the one used, and every library it imports is in
    code/requirements.txt."""
    with tarfile.open(packaged[1]) as archive:
        archive.extractall(tmp_path, filter="data")
    (tmp_path / "image.npy").write_bytes(_npy(IMAGE))
    script = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/code")
import inference
model = inference.model_fn(sys.argv[1])
body = open(sys.argv[1] + "/image.npy", "rb").read()
answer, _ = inference.transform_fn(model, body, "application/x-npy", "application/json")
files = [m.__file__ for name, m in sys.modules.items() if name.split(".")[0] == "pneumoseg"]
print(json.dumps({"answer": json.loads(answer), "files": files}))
"""
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(Path(f).is_relative_to(tmp_path / "code" / "pneumoseg") for f in report["files"])

    with package_format.open_package(packaged[1]) as model_dir:
        model = package_format.load_package(model_dir, device="cpu")
    expected = serving.predict_fn(serving.input_fn(_npy(IMAGE), "application/x-npy"), model).to_json()
    assert report["answer"] == json.loads(json.dumps(expected))

    required = required_names((tmp_path / "code" / "requirements.txt").read_text())
    distributions = packages_distributions()
    imported = {
        normalise(dist)
        for path in report["files"]
        for module in _absolute_imports(Path(path))
        for dist in distributions.get(module, [])
    }
    assert imported - {"pneumoseg"} - with_dependencies(CONTAINER | required) == set()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _absolute_imports(path: Path) -> set[str]:
    """The top-level modules a source file imports by absolute name (anywhere in it, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found
