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
  On an ensemble config the package holds the members stage 04 chose (``04_search/ensemble.json``): each member's
  checkpoints as ``<member>/fold<k>/best_<rank>.pt`` and its config as ``<member>/config.yaml``, and the manifest
  lists the members with their weights and prediction settings (see :mod:`pneumoseg.serve.package`);
* ``config.yaml`` and ``done.json``.

The package's version is ``<experiment>-<12 hex digits>``, a hash of its weights, post-processing and
prediction settings. The stage reruns when the version, the config (but its paths) or pneumoseg's code change.
Before it finishes, the archive is extracted into a temporary folder, loaded the way the server loads it, and must
predict a test image exactly as the experiment's own predictor does.

Deploying it: serve it with :mod:`pneumoseg.serve.server` (locally, or in a bring-your-own SageMaker container), or
deploy it in SageMaker's PyTorch inference container, which installs ``code/requirements.txt`` and imports
``code/inference.py`` (the SDK's ``PyTorchModel(model_data=..., entry_point="inference.py", source_dir=<the
package's code/ folder>)``, or ``SAGEMAKER_PROGRAM=inference.py`` in the model's environment).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig


from pneumoseg import layout, stage_table
from pneumoseg.config import is_ensemble
from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path, content_hash, write_json
from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor
from pneumoseg.serve.package import MANIFEST_FILE, build_manifest, load_package, open_package, source_files, write_package
from pneumoseg.stages import ensemble
from pneumoseg.stages.predict import build_predictor
from pneumoseg.stages.record import StageRecord, require_finished

log = logging.getLogger(__name__)

STAGE_NAME = stage_table.stage("06").name


def run(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Build, check and write the model package; see the module docstring.

    Returns:
        The summary: the package's path, size in bytes, name, version, models and post-processing.

    Raises:
        DataError: stage 03 has not finished, or a checkpoint or ``thresholds.json`` is missing.
        ConfigError: a bad ``predict`` section.
    """
    members = ensemble.chosen_members(cfg) if is_ensemble(cfg) else []
    if not members:
        require_finished(layout.train_dir(cfg), "03")
    predictor = build_predictor(cfg, device="cpu")
    if isinstance(predictor, EnsemblePredictor):
        files = {f"{m.name}/{_package_name(_path(model), layout.train_dir(m.cfg))}": _path(model)
                 for m, member in zip(members, predictor.members) for model in member.models}
    else:
        files = {_package_name(_path(model), layout.train_dir(cfg)): _path(model) for model in predictor.models}
    manifest = build_manifest(cfg, predictor, files)
    sources = source_files()
    # The package holds the whole resolved config and pneumoseg's code: a change to either (but to local paths)
    # rebuilds it, as a change to the weights or the post-processing does (they make the version).
    sections = [str(key) for key in cfg if key != "paths"]
    code = content_hash(*sources.values())
    record = StageRecord(STAGE_NAME, layout.package_dir(cfg), cfg, sections,
                         inputs={"version": manifest["version"], "code": code})
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()
    record.start()
    path = layout.package_path(cfg)
    with atomic_path(path) as tmp:
        write_package(tmp, cfg, manifest, {**files, **sources}, {m.name: m.cfg for m in members})
        verify_package(tmp, predictor)
    write_json(layout.package_dir(cfg) / MANIFEST_FILE, manifest)
    summary = {"package": str(path), "bytes": path.stat().st_size, "name": manifest["name"],
               "version": manifest["version"], "models": [m["file"] for m in manifest["models"]],
               "postprocess": manifest["postprocess"]}
    record.finish(summary)
    log.info("%s: %s (%.1f MB), version %s", STAGE_NAME, path, summary["bytes"] / 1e6, manifest["version"])
    return summary


def _package_name(path: Path | None, train_dir: Path) -> str:
    """A checkpoint's name inside the package: its path in ``03_train`` (``fold<k>/best_<rank>.pt``,
    ``fold<k>/ema/best_<rank>.pt``, ...)."""
    if path is None:
        raise DataError("a model of the ensemble has no checkpoint file to package")
    return path.relative_to(train_dir).as_posix()


def _path(model: FoldModel) -> Path:
    """The checkpoint a loaded model came from (:func:`pneumoseg.inference.fold_models.load_model` sets it)."""
    if model.path is None:
        raise ValueError("a model without its checkpoint file cannot be packaged")
    return model.path


def verify_package(path: Path, predictor: Predictor | EnsemblePredictor) -> None:
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


def stage(cfg: DictConfig, args: argparse.Namespace) -> None:
    """The script's entry: run the stage and print where the package is and how to serve it."""
    summary = run(cfg, force=args.force)
    print(f"model package: {summary['package']} ({summary['bytes'] / 1e6:.1f} MB), version {summary['version']}\n"
          f"  {len(summary['models'])} models, post-processing {summary['postprocess']['name']} "
          f"{summary['postprocess']['params']}\n"
          f"  serve it: python -m pneumoseg.serve --model {summary['package']} --port 8080")
