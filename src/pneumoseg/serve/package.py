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
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pneumoseg import __version__
from pneumoseg.data.resize import INTERPOLATIONS
from pneumoseg.data.rle import FORMATS
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.inference.fold_models import load_model
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor
from pneumoseg.inference.runtime import ONNXRUNTIME, choose_runtime, with_runtime
from pneumoseg.inference.tta import SIZE_MULTIPLE, TTA
from pneumoseg.io import content_hash, process_alive, read_json
from pneumoseg.modeling.device import resolve_device
from pneumoseg.postprocess.strategies import load_postprocessor
from pneumoseg.serve.archive import check_relative_name, extract_archive, file_inside
from pneumoseg.stage_table import command

log = logging.getLogger(__name__)

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

# ---------------------------------------------------------------------------------------------------------
# The schema of a manifest's settings: every value is checked before anything is built from it.

MAX_BATCH_SIZE = 256
"""Images per forward pass at most (stage 05 uses 16 or fewer)."""
MAX_VIEW_SIDE = 4096
"""Largest side of an image the models see, at the package's size times a TTA scale."""
SCALE_RANGE = (0.25, 4.0)
"""A TTA scale's bounds."""
MAX_SCALES = 8
AMP_MODES = (None, "auto", "fp16", "bf16")

Check = Callable[[Any], "str | None"]
"""A schema entry: None for a good value, else what the value should be."""


def _integer(low: int, high: int) -> Check:
    return lambda value: (
        None
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        else f"an integer in {low}..{high}"
    )


def _one_of(choices) -> Check:
    return lambda value: (
        None
        if any(value == c and type(value) is type(c) for c in choices)
        else f"one of {', '.join(map(repr, choices))}"
    )


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and 0 < len(value) <= 200 else "a string of 1 to 200 characters"


def _scale(value: Any) -> str | None:
    low, high = SCALE_RANGE
    good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if good and low <= value <= high else f"a number in {low:g}..{high:g}"


def _scales(value: Any) -> str | None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SCALES:
        return f"a list of 1 to {MAX_SCALES} scales"
    return next(
        (f"a list of numbers in {SCALE_RANGE[0]:g}..{SCALE_RANGE[1]:g}" for scale in value if _scale(scale)), None
    )


_TTA_SCHEMA: dict[str, Check] = {"hflip": _one_of((True, False)), "vflip": _one_of((True, False)), "scales": _scales}
# How a predictor predicts: at the top of a single experiment's manifest, in each member of an ensemble's.
_PREDICTOR_SCHEMA: dict[str, Check] = {
    "image_size": _integer(SIZE_MULTIPLE, MAX_VIEW_SIDE),
    "interpolation": _one_of(tuple(INTERPOLATIONS)),
    "batch_size": _integer(1, MAX_BATCH_SIZE),
    "amp": _one_of(AMP_MODES),
}
_MANIFEST_SCHEMA: dict[str, Check] = {"name": _text, "version": _text, "fmt": _one_of(FORMATS)}


def _check_schema(settings: dict, schema: dict[str, Check], prefix: str, path: Path) -> None:
    """Check the keys of ``schema`` that ``settings`` has.

    Raises:
        DataError: naming the key (``prefix`` + key), its value and what it should be.
    """
    for key, check in schema.items():
        if key in settings and (expected := check(settings[key])) is not None:
            raise DataError(f"{path}: {prefix}{key} is {_shown(settings[key])}, not {expected}; {REBUILD_HINT}")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_predictor_settings(settings: dict, prefix: str, path: Path) -> None:
    """A manifest's (or an ensemble member's) prediction settings against :data:`_PREDICTOR_SCHEMA` and its TTA
    against :data:`_TTA_SCHEMA`, every view at most :data:`MAX_VIEW_SIDE` pixels a side.

    Raises:
        DataError: naming the key.
    """
    _check_schema(settings, _PREDICTOR_SCHEMA, prefix, path)
    tta = settings.get("tta")
    if tta is None:
        return
    if not isinstance(tta, dict) or set(tta) - set(_TTA_SCHEMA):
        raise DataError(
            f"{path}: {prefix}tta is {_shown(tta)}, not null or an object of {', '.join(_TTA_SCHEMA)}; {REBUILD_HINT}"
        )
    _check_schema(tta, _TTA_SCHEMA, f"{prefix}tta.", path)
    size = settings.get("image_size")
    if size is not None and max(tta.get("scales") or [1.0]) * size > MAX_VIEW_SIDE:
        raise DataError(
            f"{path}: {prefix}tta.scales {_shown(tta['scales'])} at image_size {size} make views over "
            f"{MAX_VIEW_SIDE} px a side; {REBUILD_HINT}"
        )


def _check_postprocess(block: Any, prefix: str, path: Path) -> None:
    """A ``{name, params}`` post-processing block: a name and parameters that are finite numbers (or such blocks).

    Raises:
        DataError: naming the key.
    """
    if not (
        isinstance(block, dict) and isinstance(block.get("name"), str) and isinstance(block.get("params", {}), dict)
    ):
        raise DataError(
            f"{path}: {prefix or 'the post-processing'} is {_shown(block)}, not a {{name, params}} block; "
            f"{REBUILD_HINT}"
        )
    for key, value in block.get("params", {}).items():
        if isinstance(value, dict):
            _check_postprocess(value, f"{prefix}params.{key}.", path)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{path}: {prefix}params.{key} is {_shown(value)}, not a finite number; {REBUILD_HINT}")


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """The ``manifest.json`` of an extracted package, checked: every key :func:`load_package` reads, and each
    model entry a plain relative ``file`` with a ``sha256``.

    Raises:
        DataError: no manifest (not a package), an unreadable or incomplete one, a model entry without a plain
            relative file name or a sha256, or a layout version this code does not read.
    """
    path = Path(model_dir) / MANIFEST_FILE
    manifest = read_json(
        path,
        missing=f"{model_dir} is not a pneumoseg model package: it has no {MANIFEST_FILE}. "
        f"Build one with {command('06')} and give its model.tar.gz or the "
        f"folder it extracts to",
        invalid_fix=f"rebuild the package ({command('06')} --force)",
    )
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(
            f"{path}: package format {found!r}, but this pneumoseg reads format "
            f"{PACKAGE_FORMAT}; rebuild the package with this version ({command('06')})"
        )
    required = _MANIFEST_KEYS if "members" in manifest else (*_MANIFEST_KEYS, *_PREDICTOR_KEYS)
    missing = [key for key in required if key not in manifest]
    models = manifest.get("models")
    if missing or not isinstance(models, list) or not models:
        raise DataError(f"{path} lacks {', '.join(missing) or 'a non-empty list of models'}; {REBUILD_HINT}")
    for entry in models:
        for file_entry in [entry] + ([entry["onnx"]] if isinstance(entry, dict) and "onnx" in entry else []):
            if not (
                isinstance(file_entry, dict)
                and isinstance(file_entry.get("file"), str)
                and _SHA256_RE.match(str(file_entry.get("sha256")))
            ):
                raise DataError(f"{path}: the model entry {entry!r} lacks a file name or a sha256; {REBUILD_HINT}")
            check_relative_name(file_entry["file"], str(path))
    _check_schema(manifest, _MANIFEST_SCHEMA, "", path)
    _check_predictor_settings(manifest, "", path)
    if "postprocess" in manifest:
        _check_postprocess(manifest["postprocess"], "postprocess.", path)
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
    for index, member in enumerate(members):
        missing = [key for key in _MEMBER_KEYS if not isinstance(member, dict) or key not in member]
        if missing or not isinstance(member["models"], list) or not member["models"]:
            raise DataError(
                f"{path}: the member entry {_shown(member)} lacks {', '.join(missing) or 'model files'}; {REBUILD_HINT}"
            )
        _check_schema(member, {"name": _text}, f"members[{index}].", path)
        _check_predictor_settings(member, f"members[{index}].", path)
        if not all(isinstance(name, str) for name in member["models"]):
            raise DataError(
                f"{path}: members[{index}].models lists {_shown(member['models'])}, not file names; {REBUILD_HINT}"
            )
        weight = member["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(
                f"{path}: member {member['name']!r} has the weight {weight!r}, not a positive number; {REBUILD_HINT}"
            )
        used += member["models"]
    listed = [entry["file"] for entry in manifest["models"]]
    if sorted(used) != sorted(listed):
        raise DataError(
            f"{path}: the members' model files {sorted(used)} are not the listed models {sorted(listed)} "
            f"(each exactly once); {REBUILD_HINT}"
        )


def model_files(model_dir: Path, manifest: dict) -> list[Path]:
    """The package's model files, each found inside ``model_dir`` and matching its sha256 in the manifest.

    Raises:
        DataError: a file missing, reached through a symbolic link, or with other content than the manifest's.
    """
    files = []
    for entry in manifest["models"]:
        path = file_inside(model_dir, entry["file"], f"{model_dir / MANIFEST_FILE}")
        if content_hash(path, length=None) != entry["sha256"]:
            raise DataError(
                f"{path} does not match its sha256 in {model_dir / MANIFEST_FILE}: the package is "
                f"damaged or was changed; {REBUILD_HINT}"
            )
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
    models = {
        name: load_model(path, torch_device, fix=f"the package is damaged; {REBUILD_HINT}")
        for name, path in files.items()
    }
    onnx_entries = [entry.get("onnx") for entry in manifest["models"]]
    if choose_runtime(runtime, torch_device, all(onnx_entries)) == ONNXRUNTIME:
        # Each ONNX file's sha256 is checked as it is read (before ONNX Runtime parses it), so not here.
        sources = [
            (file_inside(model_dir, entry["file"], str(model_dir / MANIFEST_FILE)), entry["sha256"])
            for entry in onnx_entries
        ]
        models = dict(zip(models, with_runtime(list(models.values()), ONNXRUNTIME, sources)))
    postprocessor = _postprocessor(model_dir / THRESHOLDS_FILE)
    if "members" in manifest:
        specs = manifest["members"]
        members = [_predictor(spec, [models[name] for name in spec["models"]], postprocessor) for spec in specs]
        predictor: Predictor | EnsemblePredictor = EnsemblePredictor(
            members, [float(spec["weight"]) for spec in specs], postprocessor, [str(spec["name"]) for spec in specs]
        )
    else:
        predictor = _predictor(manifest, list(models.values()), postprocessor)
    # One blank prediction first: lazy initialisation (kernels, allocator) would otherwise slow the first request.
    predictor.predict([np.zeros((predictor.image_size, predictor.image_size), np.uint8)])
    return ServingModel(
        predictor=predictor,
        name=str(manifest["name"]),
        version=str(manifest["version"]),
        fmt=str(manifest["fmt"]),
        manifest=manifest,
    )


def _postprocessor(path: Path):
    """The package's post-processing (``thresholds.json``), checked like the manifest's block first.

    Raises:
        DataError: naming the file and what is wrong.
    """
    block = read_json(
        path, missing=f"{path} not found: the package is incomplete; {REBUILD_HINT}", invalid_fix=REBUILD_HINT
    )
    _check_postprocess(block, "", path)
    try:
        return load_postprocessor(path)
    except ConfigError as exc:  # a parameter out of its range
        raise DataError(f"{path}: {exc}; {REBUILD_HINT}") from None


def _predictor(settings: dict, models: list, postprocessor) -> Predictor:
    """The :class:`Predictor` of a manifest's (or an ensemble member's) prediction settings."""
    return Predictor(
        models,
        TTA.from_config(settings["tta"]),
        postprocessor,
        interpolation=settings["interpolation"],
        batch_size=int(settings["batch_size"]),
        amp=settings["amp"],
    )


EXTRACTION_PREFIX = "pneumoseg-model-"
"""The temporary folders of :func:`open_package` are ``pneumoseg-model-<pid>-<random>``: the process id tells a
killed server's leftover from a live one's folder."""
_EXTRACTION_RE = re.compile(rf"^{EXTRACTION_PREFIX}(\d+)-")


def sweep_stale_extractions(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the extraction folders of :func:`open_package` left by processes that are gone (a server killed
    while it ran), and return them. Folders of live processes, of other users, or without a process id are kept.

    Args:
        folder: where to look; default the temporary folder (``tempfile.gettempdir()``).
    """
    removed = []
    for entry in Path(folder or tempfile.gettempdir()).glob(f"{EXTRACTION_PREFIX}*"):
        match = _EXTRACTION_RE.match(entry.name)
        try:
            mine = entry.is_dir() and not entry.is_symlink() and entry.stat().st_uid == os.getuid()
        except OSError:  # removed meanwhile
            continue
        if match and mine and not process_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        log.info(
            "removed %d extraction folder(s) of stopped servers: %s",
            len(removed),
            ", ".join(str(path) for path in removed),
        )
    return removed


@contextlib.contextmanager
def open_package(path: str | os.PathLike) -> Iterator[Path]:
    """The folder of a model package: ``path`` itself when it is a folder; a ``model.tar.gz`` is extracted into a
    temporary folder named by this process (see :data:`EXTRACTION_PREFIX`), removed when the block ends; those
    that killed processes left are removed first (:func:`sweep_stale_extractions`).

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
    sweep_stale_extractions()
    with tempfile.TemporaryDirectory(prefix=f"{EXTRACTION_PREFIX}{os.getpid()}-") as folder:
        extract_archive(path, Path(folder))
        yield Path(folder)


# What pneumoseg.serve.handler imports that SageMaker's PyTorch inference container lacks (their own dependencies,
# huggingface-hub and safetensors, come with them), and pydicom's decoders of clinical DICOMs (JPEG 2000, lossless
# JPEG, JPEG-LS, fast RLE), which pydicom imports when it lists its plugins. The container's own torch,
# torchvision, numpy, pandas, pillow and opencv-python are never listed: pip would replace them at every start (or
# add a second cv2 beside its own). onnxruntime runs the package's ONNX models on a CPU instance (the container has
# none; without it, torch predicts).
SERVING_REQUIREMENTS = (
    "segmentation-models-pytorch",
    "timm",
    "pydicom",
    "omegaconf",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "onnxruntime",
)

ENTRY_POINT = '''"""SageMaker's entry point: the handler of pneumoseg.serve.handler (the package is in code/pneumoseg/).

transform_fn takes the toolkit's context, so an error is answered with its own status and a JSON message.
"""
from pneumoseg.serve.handler import model_fn, transform_fn

__all__ = ["model_fn", "transform_fn"]
'''


def build_manifest(cfg: DictConfig, predictor: Predictor | EnsemblePredictor, files: dict[str, Path]) -> dict[str, Any]:
    """The package's ``manifest.json``: what it holds and how it predicts (see :func:`load_package`).

    Args:
        cfg: the resolved config (``experiment`` names the package; ``predict.fmt`` is the run-length form).
        predictor: the experiment's predictor, whose models, TTA, resizing, batch size and AMP are recorded; or an
            ensemble's, whose members are recorded so.
        files: package name -> checkpoint file, for each of ``predictor.models`` in order.
    """
    models = [
        {
            "file": name,
            "fold": model.fold,
            "epoch": model.epoch,
            "score": model.score,
            "sha256": content_hash(path, length=None),
        }
        for (name, path), model in zip(files.items(), predictor.models)
    ]
    if isinstance(predictor, EnsemblePredictor):
        names = iter(files)
        members = [
            {"name": name, "weight": weight, **_settings(member), "models": [next(names) for _ in member.models]}
            for name, weight, member in zip(predictor.names, predictor.weights, predictor.members)
        ]
        settings = {"image_size": predictor.image_size, "members": members}
    else:
        settings = _settings(predictor)
    settings.update(fmt=str(cfg.predict.fmt), postprocess=predictor.postprocessor.to_block())
    content = json.dumps({"models": [m["sha256"] for m in models], **settings}, sort_keys=True)
    name = str(cfg.experiment)
    return {
        "format": PACKAGE_FORMAT,
        "name": name,
        "version": f"{name}-{hashlib.sha256(content.encode()).hexdigest()[:12]}",
        "pneumoseg_version": __version__,
        "models": models,
        **settings,
    }


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
    return {
        "image_size": predictor.image_size,
        "tta": {**asdict(predictor.tta), "scales": list(predictor.tta.scales)},
        "interpolation": predictor.interpolation,
        "batch_size": predictor.batch_size,
        "amp": predictor.amp,
    }


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
    lines = [
        "# What pneumoseg.serve.handler needs beyond SageMaker's PyTorch inference container (which has torch,",
        "# torchvision, numpy, pandas, pillow and OpenCV). A network-isolated endpoint cannot pip-install: see",
        "# the README's serving section (bundled wheels, or a custom image).",
    ]
    lines += [f"{name}{compatible_range(installed_version(name))}" for name in SERVING_REQUIREMENTS]
    return "\n".join(lines) + "\n"


def source_files() -> dict[str, Path]:
    """This package's Python source, by its name inside the model package (``code/pneumoseg/...``)."""
    root = Path(__file__).resolve().parents[1]
    return {
        f"{CODE_DIR}/pneumoseg/{path.relative_to(root).as_posix()}": path
        for path in sorted(root.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def write_package(
    path: Path,
    cfg: DictConfig,
    manifest: dict[str, Any],
    files: dict[str, Path],
    member_configs: dict[str, DictConfig] | None = None,
) -> None:
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
        **{
            f"{name}/{CONFIG_FILE}": OmegaConf.to_yaml(member, resolve=True)
            for name, member in (member_configs or {}).items()
        },
    }
    entries: dict[str, bytes | Path] = {**{name: text.encode() for name, text in texts.items()}, **files}
    # gzip would record the (temporary, random) file name and the time in its header: neither is kept.
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for name in sorted(entries):
            content = entries[name]
            data = content if isinstance(content, bytes) else content.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
