"""Stage 06: package the trained ensemble as a self-contained SageMaker PyTorch model (``model.tar.gz``).

Inputs: the experiment's fold checkpoints (``03_train/fold<k>/best_<rank>.pt``) and post-processing, chosen
exactly as stage 05 chooses them (:meth:`pneumoseg.inference.predictor.Predictor.from_experiment`: ``predict.top_k``,
``train.folds``, ``postprocess.source``), the ``tta`` section, ``prepare.interpolation`` and ``predict``'s batch
size, AMP and run-length form.

Outputs in ``${paths.experiment_dir}/06_package/``:

* ``model.tar.gz`` in the layout of :mod:`pneumoseg.serve.handler` (``manifest.json``, ``thresholds.json``,
  ``config.yaml``, ``fold<k>/best_<rank>.pt``, ``code/inference.py``, ``code/requirements.txt``, ``code/pneumoseg/``).
  The archive is reproducible: the same inputs give the same bytes;
* ``manifest.json``, a copy of the package's, to read without extracting it;
* ``config.yaml`` and ``done.json``.

The package's version is ``<experiment>-<12 hex digits>``, a hash of its weights, post-processing and
prediction settings. The stage reruns when the version, the config (but its paths) or pneumoseg's code change.
Before it finishes, the archive is extracted into a temporary folder, loaded the way the server loads it, and must
predict a test image exactly as the experiment's own predictor does.

Deploying it: serve it with :mod:`pneumoseg.serve.server` (locally, or in a bring-your-own SageMaker container), or deploy
it in SageMaker's PyTorch inference container, which installs ``code/requirements.txt`` and imports
``code/inference.py`` (the SDK's ``PyTorchModel(model_data=..., entry_point="inference.py", source_dir=<the
package's code/ folder>)``, or ``SAGEMAKER_PROGRAM=inference.py`` in the model's environment).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import tarfile
from dataclasses import asdict
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pneumoseg import __version__

from pneumoseg import layout
from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path, write_json
from pneumoseg.inference.predictor import Predictor
from pneumoseg.serve.handler import (CODE_DIR, CONFIG_FILE, MANIFEST_FILE, PACKAGE_FORMAT, THRESHOLDS_FILE, load_package,
                       open_package)
from pneumoseg.stages.record import DONE_FILE, StageRecord

log = logging.getLogger(__name__)

STAGE_NAME = "06_package_model"

# The distributions that pneumoseg.serve.handler imports, pinned in code/requirements.txt at the versions installed here.
# torch and torchvision are left out: SageMaker's PyTorch container has its own build (for its CUDA), which a
# pinned wheel would replace.
SERVING_REQUIREMENTS = ("segmentation-models-pytorch", "timm", "huggingface-hub", "safetensors", "albumentations",
                        "pydicom", "pillow", "opencv-python-headless", "numpy", "pandas", "omegaconf")

ENTRY_POINT = '''"""SageMaker's entry point: the handler functions of pneumoseg.serve.handler (the package is in code/pneumoseg/)."""
from pneumoseg.serve.handler import input_fn, model_fn, output_fn, predict_fn

__all__ = ["model_fn", "input_fn", "predict_fn", "output_fn"]
'''


def run(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Build, check and write the model package; see the module docstring.

    Returns:
        The summary: the package's path, size in bytes, name, version, models and post-processing.

    Raises:
        DataError: stage 03 has not finished, or a checkpoint or ``thresholds.json`` is missing.
        ConfigError: a bad ``predict`` section.
    """
    done = layout.train_dir(cfg) / DONE_FILE
    if not done.is_file():
        raise DataError(f"stage 03 has not finished: {done} is missing. Train every fold of train.folds first "
                        f"(scripts/03_train.py).")
    predictor = Predictor.from_experiment(cfg, device="cpu")
    files = {_package_name(model.path): model.path for model in predictor.models}
    manifest = build_manifest(cfg, predictor, files)
    sources = _source_files()
    # The package holds the whole resolved config and pneumoseg's code: a change to either (but to local paths)
    # rebuilds it, as a change to the weights or the post-processing does (they make the version).
    sections = [key for key in cfg if key != "paths"]
    code = hashlib.sha256(b"".join(path.read_bytes() for path in sources.values())).hexdigest()[:16]
    record = StageRecord(STAGE_NAME, layout.package_dir(cfg), cfg, sections,
                         inputs={"version": manifest["version"], "code": code})
    if record.skip_if_complete(force):
        return record.stored_summary()
    record.start()
    path = layout.package_path(cfg)
    with atomic_path(path) as tmp:
        write_package(tmp, cfg, manifest, {**files, **sources})
        verify_package(tmp, predictor)
    write_json(layout.package_dir(cfg) / MANIFEST_FILE, manifest)
    summary = {"package": str(path), "bytes": path.stat().st_size, "name": manifest["name"],
               "version": manifest["version"], "models": [m["file"] for m in manifest["models"]],
               "postprocess": manifest["postprocess"]}
    record.finish(summary)
    log.info("%s: %s (%.1f MB), version %s", STAGE_NAME, path, summary["bytes"] / 1e6, manifest["version"])
    return summary


def _package_name(path: Path | None) -> str:
    """A checkpoint's name inside the package: ``fold<k>/best_<rank>.pt``, as in ``03_train``."""
    if path is None:
        raise DataError("a model of the ensemble has no checkpoint file to package")
    return f"{path.parent.name}/{path.name}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(cfg: DictConfig, predictor: Predictor, files: dict[str, Path]) -> dict[str, Any]:
    """The package's ``manifest.json``: what it holds and how it predicts (see :func:`pneumoseg.serve.handler.load_package`).

    Args:
        cfg: the resolved config (``experiment`` names the package; ``predict.fmt`` is the run-length form).
        predictor: the experiment's predictor, whose models, TTA, resizing, batch size and AMP are recorded.
        files: package name -> checkpoint file, for each of ``predictor.models`` in order.
    """
    models = [{"file": name, "fold": model.fold, "epoch": model.epoch, "score": model.score,
               "sha256": _sha256(path)}
              for (name, path), model in zip(files.items(), predictor.models)]
    settings = {
        "image_size": predictor.image_size,
        "tta": {**asdict(predictor.tta), "scales": list(predictor.tta.scales)},
        "interpolation": predictor.interpolation,
        "batch_size": predictor.batch_size,
        "amp": predictor.amp,
        "fmt": str(cfg.predict.fmt),
        "postprocess": predictor.postprocessor.to_block(),
    }
    content = json.dumps({"models": [m["sha256"] for m in models], **settings}, sort_keys=True)
    name = str(cfg.experiment)
    return {"format": PACKAGE_FORMAT, "name": name,
            "version": f"{name}-{hashlib.sha256(content.encode()).hexdigest()[:12]}",
            "pneumoseg_version": __version__, "models": models, **settings}


def requirements_text() -> str:
    """``code/requirements.txt``: :data:`SERVING_REQUIREMENTS` pinned at the versions installed here."""
    lines = ["# What pneumoseg.serve.handler needs beyond SageMaker's PyTorch container (torch, torchvision), at the",
             "# versions the package was built and tested with."]
    lines += [f"{name}=={installed_version(name)}" for name in SERVING_REQUIREMENTS]
    return "\n".join(lines) + "\n"


def _source_files() -> dict[str, Path]:
    """This package's Python source, by its name inside the model package (``code/pneumoseg/...``)."""
    root = Path(__file__).resolve().parents[1]
    return {f"{CODE_DIR}/pneumoseg/{path.relative_to(root).as_posix()}": path
            for path in sorted(root.rglob("*.py")) if "__pycache__" not in path.parts}


def write_package(path: Path, cfg: DictConfig, manifest: dict[str, Any], files: dict[str, Path]) -> None:
    """Write the ``model.tar.gz`` of ``manifest`` to ``path``: its JSON and YAML files, ``code/inference.py`` and
    ``code/requirements.txt``, and ``files`` (name in the package -> file: weights, source). Entries are in name
    order, with fixed times and owners, so that the same inputs give the same bytes."""
    texts = {
        MANIFEST_FILE: json.dumps(manifest, indent=2, sort_keys=True) + "\n",
        THRESHOLDS_FILE: json.dumps(manifest["postprocess"], indent=2, sort_keys=True) + "\n",
        CONFIG_FILE: OmegaConf.to_yaml(cfg, resolve=True),
        f"{CODE_DIR}/inference.py": ENTRY_POINT,
        f"{CODE_DIR}/requirements.txt": requirements_text(),
    }
    entries = {**{name: text.encode() for name, text in texts.items()}, **files}
    # gzip would record the (temporary, random) file name and the time in its header: neither is kept.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(entries):
            content = entries[name]
            data = content if isinstance(content, bytes) else content.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))


def verify_package(path: Path, predictor: Predictor) -> None:
    """Extract the package, load it as the server does, and check that it predicts a test image exactly as
    ``predictor`` does.

    Raises:
        RuntimeError: the predictions differ (a bug: the package does not hold what it should).
    """
    size = predictor.image_size
    # A smooth gradient with a bright disc: something for every view and threshold to respond to.
    rows, cols = np.mgrid[0:size * 2, 0:size * 2]
    image = ((rows + cols) * (127 / (4 * size)) + 120 * ((rows - size) ** 2 + (cols - size) ** 2 < (size / 2) ** 2))
    image = image.astype(np.uint8)
    with open_package(path) as model_dir:
        packaged = load_package(model_dir, device="cpu")
        [expected] = predictor.predict([image])
        [found] = packaged.predictor.predict([image])
    if not (np.array_equal(expected.probs, found.probs) and np.array_equal(expected.mask, found.mask)):
        raise RuntimeError(f"the package {path} does not predict as the experiment's predictor does "
                           f"(max difference {np.abs(expected.probs - found.probs).max():.3g})")


def cli(cfg: DictConfig, args) -> None:
    """The script's entry: run the stage and print where the package is and how to serve it."""
    summary = run(cfg, force=args.force)
    print(f"model package: {summary['package']} ({summary['bytes'] / 1e6:.1f} MB), version {summary['version']}\n"
          f"  {len(summary['models'])} models, post-processing {summary['postprocess']['name']} "
          f"{summary['postprocess']['params']}\n"
          f"  serve it: python -m pneumoseg.serve --model {summary['package']} --port 8080")
