"""The model package's format, written by stage 06 and read by the handler and the server; one home for both.

A package is a folder, or its ``model.tar.gz``:

* ``manifest.json``: name, version, the model files with their sha256, and how to predict (TTA, resizing, batch
  size, AMP);
* ``thresholds.json``: the post-processing as a ``{name, params}`` block;
* ``config.yaml``: the experiment's resolved config, for the record;
* ``fold<k>/best_<rank>.pt``: the weights, in stage 03's checkpoint format (tensors and plain data only, loaded
  with ``weights_only=True``: no pickled code, no download);
* ``fold<k>/best_<rank>.onnx`` beside each: the same network exported to ONNX (dynamic batch, the gate head's
  output included where the model has one), listed in its model entry's ``onnx`` (file and sha256); ONNX Runtime
  predicts with it on the CPU (see :mod:`pneumoseg.inference.runtime`); a package without them predicts with torch;
* an ensemble of experiments instead has ``<member>/fold<k>/best_<rank>.pt`` and ``<member>/config.yaml`` for each
  member, and its manifest a ``members`` list: each member's name, weight, model files and how it predicts (TTA,
  image size, resizing, batch size, AMP); the package predicts with
  :class:`pneumoseg.inference.predictor.EnsemblePredictor`;
* ``code/inference.py`` (imports the handler's functions from :mod:`pneumoseg.serve.handler`),
  ``code/requirements.txt`` and ``code/pneumoseg/`` (this package's source), which SageMaker's container puts on
  its Python path.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pneumoseg import __version__
from pneumoseg.errors import DataError
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor
from pneumoseg.inference.fold_models import load_model
from pneumoseg.inference.runtime import ONNXRUNTIME, choose_runtime, with_runtime
from pneumoseg.inference.tta import TTA
from pneumoseg.io import content_hash, read_json
from pneumoseg.postprocess.strategies import load_postprocessor
from pneumoseg.modeling.device import resolve_device
from pneumoseg.serve.archive import check_relative_name, extract_archive, file_inside
from pneumoseg.stage_table import command


MANIFEST_FILE = "manifest.json"
THRESHOLDS_FILE = "thresholds.json"
CONFIG_FILE = "config.yaml"
CODE_DIR = "code"
PACKAGE_FORMAT = 1
"""The version of the package layout; :func:`load_package` refuses others."""


@dataclass
class ServingModel:
    """A loaded model package.

    Attributes:
        predictor: the fold ensemble with its TTA and post-processing, or an ensemble of experiments (the one
            stage 05 uses).
        name: the experiment the package was built from.
        version: identifies the package's weights and post-processing (see the package stage).
        fmt: the run-length form of its responses, the submission's (``relative`` or ``absolute``).
        manifest: the package's ``manifest.json``.
    """

    predictor: Predictor | EnsemblePredictor
    name: str
    version: str
    fmt: str
    manifest: dict

    @property
    def postprocess(self) -> dict[str, Any]:
        """The post-processing as a ``{name, params}`` block."""
        return self.predictor.postprocessor.to_block()

    @property
    def runtime(self) -> str:
        """What computes the forward passes: ``torch`` or ``onnxruntime``."""
        return self.predictor.runtime


REBUILD_HINT = f"copy the package again, or rebuild it ({command('06')} --force)"
_MANIFEST_KEYS = ("name", "version", "fmt", "models")
# How a predictor predicts: at the top of a single experiment's manifest, in each member of an ensemble's.
_PREDICTOR_KEYS = ("tta", "interpolation", "batch_size", "amp")
_MEMBER_KEYS = ("name", "weight", "models", *_PREDICTOR_KEYS)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """The ``manifest.json`` of an extracted package, checked: every key :func:`load_package` reads, and each
    model entry a plain relative ``file`` with a ``sha256``.

    Raises:
        DataError: no manifest (not a package), an unreadable or incomplete one, a model entry without a plain
            relative file name or a sha256, or a layout version this code does not read.
    """
    path = Path(model_dir) / MANIFEST_FILE
    manifest = read_json(path, missing=f"{model_dir} is not a pneumoseg model package: it has no {MANIFEST_FILE}. "
                                       f"Build one with {command('06')} and give its model.tar.gz or the "
                                       f"folder it extracts to",
                         invalid_fix=f"rebuild the package ({command('06')} --force)")
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: package format {found!r}, but this pneumoseg reads format "
                        f"{PACKAGE_FORMAT}; rebuild the package with this version ({command('06')})")
    required = _MANIFEST_KEYS if "members" in manifest else (*_MANIFEST_KEYS, *_PREDICTOR_KEYS)
    missing = [key for key in required if key not in manifest]
    models = manifest.get("models")
    if missing or not isinstance(models, list) or not models:
        raise DataError(f"{path} lacks {', '.join(missing) or 'a non-empty list of models'}; {REBUILD_HINT}")
    for entry in models:
        for file_entry in [entry] + ([entry["onnx"]] if isinstance(entry, dict) and "onnx" in entry else []):
            if not (isinstance(file_entry, dict) and isinstance(file_entry.get("file"), str)
                    and _SHA256_RE.match(str(file_entry.get("sha256")))):
                raise DataError(f"{path}: the model entry {entry!r} lacks a file name or a sha256; {REBUILD_HINT}")
            check_relative_name(file_entry["file"], str(path))
    if "members" in manifest:
        _check_members(manifest, path)
    return manifest


def _check_members(manifest: dict, path: Path) -> None:
    """An ensemble manifest's ``members``: each with :data:`_MEMBER_KEYS`, a positive weight, and model files
    that the manifest lists, every listed file in exactly one member.

    Raises:
        DataError: names what is wrong.
    """
    members = manifest["members"]
    if not isinstance(members, list) or not members:
        raise DataError(f"{path}: members must be a non-empty list; {REBUILD_HINT}")
    used = []
    for member in members:
        missing = [key for key in _MEMBER_KEYS if not isinstance(member, dict) or key not in member]
        if missing or not isinstance(member["models"], list) or not member["models"]:
            raise DataError(f"{path}: the member entry {member!r} lacks {', '.join(missing) or 'model files'}; "
                            f"{REBUILD_HINT}")
        weight = member["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"{path}: member {member['name']!r} has the weight {weight!r}, not a positive number; "
                            f"{REBUILD_HINT}")
        used += member["models"]
    listed = [entry["file"] for entry in manifest["models"]]
    if sorted(used) != sorted(listed):
        raise DataError(f"{path}: the members' model files {sorted(used)} are not the listed models {sorted(listed)} "
                        f"(each exactly once); {REBUILD_HINT}")


def model_files(model_dir: Path, manifest: dict) -> list[Path]:
    """The package's model files, each found inside ``model_dir`` and matching its sha256 in the manifest.

    Raises:
        DataError: a file missing, reached through a symbolic link, or with other content than the manifest's.
    """
    files = []
    for entry in manifest["models"]:
        path = file_inside(model_dir, entry["file"], f"{model_dir / MANIFEST_FILE}")
        if content_hash(path, length=None) != entry["sha256"]:
            raise DataError(f"{path} does not match its sha256 in {model_dir / MANIFEST_FILE}: the package is "
                            f"damaged or was changed; {REBUILD_HINT}")
        files.append(path)
    return files


def load_package(model_dir: str | os.PathLike, device: str = "auto", runtime: str = "auto") -> ServingModel:
    """Load an extracted model package: its fold models, TTA, resizing and post-processing, then predict a blank
    image once to warm it up. Needs no network and reads nothing outside ``model_dir``.

    Args:
        model_dir: the package folder (``model.tar.gz`` extracted; see :func:`open_package`).
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda``.
        runtime: ``auto`` (ONNX Runtime on the CPU when the package holds ONNX models and onnxruntime imports, else
            torch), ``torch`` or ``onnxruntime``; see :func:`pneumoseg.inference.runtime.choose_runtime`.

    Raises:
        DataError: not a package, or a file of it missing, outside it, damaged, or not matching its sha256; an ONNX
            model that ONNX Runtime cannot load or that is not its checkpoint's export.
        ConfigError: a device that is not there, or an unknown runtime.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    files = dict(zip((entry["file"] for entry in manifest["models"]), model_files(model_dir, manifest)))
    torch_device = resolve_device(device)
    models = {name: load_model(path, torch_device, fix=f"the package is damaged; {REBUILD_HINT}")
              for name, path in files.items()}
    onnx_entries = [entry.get("onnx") for entry in manifest["models"]]
    if choose_runtime(runtime, torch_device, all(onnx_entries)) == ONNXRUNTIME:
        # Each ONNX file's sha256 is checked as it is read (before ONNX Runtime parses it), so not here.
        sources = [(file_inside(model_dir, entry["file"], str(model_dir / MANIFEST_FILE)), entry["sha256"])
                   for entry in onnx_entries]
        models = dict(zip(models, with_runtime(list(models.values()), ONNXRUNTIME, sources)))
    postprocessor = load_postprocessor(model_dir / THRESHOLDS_FILE)
    if "members" in manifest:
        specs = manifest["members"]
        members = [_predictor(spec, [models[name] for name in spec["models"]], postprocessor) for spec in specs]
        predictor: Predictor | EnsemblePredictor = EnsemblePredictor(
            members, [float(spec["weight"]) for spec in specs], postprocessor, [str(spec["name"]) for spec in specs])
    else:
        predictor = _predictor(manifest, list(models.values()), postprocessor)
    # One blank prediction first: lazy initialisation (kernels, allocator) would otherwise slow the first request.
    predictor.predict([np.zeros((predictor.image_size, predictor.image_size), np.uint8)])
    return ServingModel(predictor=predictor, name=str(manifest["name"]), version=str(manifest["version"]),
                        fmt=str(manifest["fmt"]), manifest=manifest)


def _predictor(settings: dict, models: list, postprocessor) -> Predictor:
    """The :class:`Predictor` of a manifest's (or an ensemble member's) prediction settings."""
    return Predictor(models, TTA.from_config(settings["tta"]), postprocessor, interpolation=settings["interpolation"],
                     batch_size=int(settings["batch_size"]), amp=settings["amp"])


@contextlib.contextmanager
def open_package(path: str | os.PathLike) -> Iterator[Path]:
    """The folder of a model package: ``path`` itself when it is a folder; a ``model.tar.gz`` is extracted into a
    temporary folder, removed when the block ends.

    Extraction takes only regular files and folders with plain relative names, within a member count and a
    size (see :mod:`pneumoseg.serve.archive`); anything else refuses the whole package before a file is written.

    Raises:
        DataError: ``path`` does not exist, is not a readable tar archive, or holds a link, a device, an absolute
            or ``..`` name, or too much.
    """
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise DataError(f"model package {path} not found; build it with {command('06')}")
    with tempfile.TemporaryDirectory(prefix="pneumoseg-model-") as folder:
        extract_archive(path, Path(folder))
        yield Path(folder)


# What pneumoseg.serve.handler imports that SageMaker's PyTorch inference container lacks (their own dependencies,
# huggingface-hub and safetensors, come with them). The container's own torch, torchvision, numpy, pandas, pillow
# and opencv-python are never listed: pip would replace them at every start (or add a second cv2 beside its own).
# onnxruntime runs the package's ONNX models on a CPU instance (the container has none; without it, torch predicts).
SERVING_REQUIREMENTS = ("segmentation-models-pytorch", "timm", "pydicom", "omegaconf", "onnxruntime")

ENTRY_POINT = '''"""SageMaker's entry point: the handler of pneumoseg.serve.handler (the package is in code/pneumoseg/).

transform_fn takes the toolkit's context, so an error is answered with its own status and a JSON message.
"""
from pneumoseg.serve.handler import model_fn, transform_fn

__all__ = ["model_fn", "transform_fn"]
'''


def build_manifest(cfg: DictConfig, predictor: Predictor | EnsemblePredictor,
                   files: dict[str, Path]) -> dict[str, Any]:
    """The package's ``manifest.json``: what it holds and how it predicts (see :func:`load_package`).

    Args:
        cfg: the resolved config (``experiment`` names the package; ``predict.fmt`` is the run-length form).
        predictor: the experiment's predictor, whose models, TTA, resizing, batch size and AMP are recorded; or an
            ensemble's, whose members are recorded so.
        files: package name -> checkpoint file, for each of ``predictor.models`` in order.
    """
    models = [{"file": name, "fold": model.fold, "epoch": model.epoch, "score": model.score,
               "sha256": content_hash(path, length=None)}
              for (name, path), model in zip(files.items(), predictor.models)]
    if isinstance(predictor, EnsemblePredictor):
        names = iter(files)
        members = [{"name": name, "weight": weight, **_settings(member),
                    "models": [next(names) for _ in member.models]}
                   for name, weight, member in zip(predictor.names, predictor.weights, predictor.members)]
        settings = {"image_size": predictor.image_size, "members": members}
    else:
        settings = _settings(predictor)
    settings.update(fmt=str(cfg.predict.fmt), postprocess=predictor.postprocessor.to_block())
    content = json.dumps({"models": [m["sha256"] for m in models], **settings}, sort_keys=True)
    name = str(cfg.experiment)
    return {"format": PACKAGE_FORMAT, "name": name,
            "version": f"{name}-{hashlib.sha256(content.encode()).hexdigest()[:12]}",
            "pneumoseg_version": __version__, "models": models, **settings}


def add_onnx_models(manifest: dict[str, Any], onnx_files: dict[str, tuple[str, Path]]) -> None:
    """List each checkpoint's ONNX export in its model entry as ``onnx: {file, sha256}``.

    Args:
        manifest: from :func:`build_manifest`; changed in place (the version, a hash of the weights and settings,
            stays: the ONNX models are exports of the same weights).
        onnx_files: checkpoint's name in the package -> the ONNX file's name in the package and its path here.
    """
    for entry in manifest["models"]:
        name, path = onnx_files[entry["file"]]
        entry["onnx"] = {"file": name, "sha256": content_hash(path, length=None)}


def _settings(predictor: Predictor) -> dict[str, Any]:
    """How a :class:`Predictor` predicts, as the manifest records it."""
    return {"image_size": predictor.image_size, "tta": {**asdict(predictor.tta), "scales": list(predictor.tta.scales)},
            "interpolation": predictor.interpolation, "batch_size": predictor.batch_size, "amp": predictor.amp}


def compatible_range(version: str) -> str:
    """The versions compatible with ``version`` as a pip range: from it to the next major release (the next minor
    one for a 0.x version), e.g. ``1.0.31`` -> ``>=1.0.31,<2``, ``0.6.0`` -> ``>=0.6.0,<0.7``."""
    parts = [int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit()]
    major, minor = (parts + [0, 0])[:2]
    upper = f"0.{minor + 1}" if major == 0 else str(major + 1)
    return f">={version.split('+')[0]},<{upper}"


def requirements_text() -> str:
    """``code/requirements.txt``: :data:`SERVING_REQUIREMENTS`, each from the version installed here (the one the
    package is tested with) to its next major release."""
    lines = ["# What pneumoseg.serve.handler needs beyond SageMaker's PyTorch inference container (which has torch,",
             "# torchvision, numpy, pandas, pillow and OpenCV). A network-isolated endpoint cannot pip-install: see",
             "# the README's serving section (bundled wheels, or a custom image)."]
    lines += [f"{name}{compatible_range(installed_version(name))}" for name in SERVING_REQUIREMENTS]
    return "\n".join(lines) + "\n"


def source_files() -> dict[str, Path]:
    """This package's Python source, by its name inside the model package (``code/pneumoseg/...``)."""
    root = Path(__file__).resolve().parents[1]
    return {f"{CODE_DIR}/pneumoseg/{path.relative_to(root).as_posix()}": path
            for path in sorted(root.rglob("*.py")) if "__pycache__" not in path.parts}


def write_package(path: Path, cfg: DictConfig, manifest: dict[str, Any], files: dict[str, Path],
                  member_configs: dict[str, DictConfig] | None = None) -> None:
    """Write the ``model.tar.gz`` of ``manifest`` to ``path``: its JSON and YAML files, ``code/inference.py`` and
    ``code/requirements.txt``, ``files`` (name in the package -> file: weights, source) and an ensemble's
    ``member_configs`` (member name -> its resolved config, written as ``<member>/config.yaml``). Entries are in
    name order, with fixed times and owners, so that the same inputs give the same bytes."""
    texts = {
        MANIFEST_FILE: json.dumps(manifest, indent=2, sort_keys=True) + "\n",
        THRESHOLDS_FILE: json.dumps(manifest["postprocess"], indent=2, sort_keys=True) + "\n",
        CONFIG_FILE: OmegaConf.to_yaml(cfg, resolve=True),
        f"{CODE_DIR}/inference.py": ENTRY_POINT,
        f"{CODE_DIR}/requirements.txt": requirements_text(),
        **{f"{name}/{CONFIG_FILE}": OmegaConf.to_yaml(member, resolve=True)
           for name, member in (member_configs or {}).items()},
    }
    entries: dict[str, bytes | Path] = {**{name: text.encode() for name, text in texts.items()}, **files}
    # gzip would record the (temporary, random) file name and the time in its header: neither is kept.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(entries):
            content = entries[name]
            data = content if isinstance(content, bytes) else content.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
