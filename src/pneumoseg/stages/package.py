"""Stage 06: package the trained ensemble as a self-contained SageMaker PyTorch model (``model.tar.gz``).

Inputs: the experiment's fold checkpoints (``03_train/fold<k>/best_<rank>.pt``) and post-processing, chosen
exactly as stage 05 chooses them (:meth:`pneumoseg.inference.predictor.Predictor.from_experiment`: ``predict.top_k``,
``train.folds``, ``postprocess.source``), the ``tta`` section, ``prepare.interpolation`` and ``predict``'s batch
size, AMP and run-length form.

Outputs in ``${paths.experiment_dir}/06_package/``:

* ``model.tar.gz`` in the layout of :mod:`pneumoseg.serve.handler` (``manifest.json``, ``thresholds.json``,
  ``config.yaml``, ``fold<k>/best_<rank>.pt`` and its ONNX export ``fold<k>/best_<rank>.onnx``, ``code/inference.py``,
  ``code/requirements.txt``, ``code/pneumoseg/``). The archive is reproducible: the same inputs give the same bytes;
* ``manifest.json``, a copy of the package's, to read without extracting it;
  On an ensemble config the package holds the members stage 04 chose (``04_search/ensemble.json``): each member's
  checkpoints as ``<member>/fold<k>/best_<rank>.pt`` and its config as ``<member>/config.yaml``, and the manifest
  lists the members with their weights and prediction settings (see :mod:`pneumoseg.serve.package`);
* ``config.yaml`` and ``done.json``.

The package's version is ``<experiment>-<12 hex digits>``, a hash of its weights, post-processing and
prediction settings. The stage reruns when the version, the config (but its paths) or pneumoseg's code change.
Before it finishes, the archive is extracted into a temporary folder, loaded the way the server loads it, and must
predict a test image exactly as the experiment's own predictor does, with torch and with ONNX Runtime.

The ONNX models (:mod:`pneumoseg.inference.runtime`) are checked against torch before the package is written: the
demo's test images (stage 01's PNGs of stage 02's test list; a synthetic image when there are none) are predicted
through both runtimes, and the largest probability difference, the share of mask pixels that differ after the
post-processing, the Dice between the two submissions and, with the held-out labels, the test score through each
are recorded in the manifest (``onnx_check``) and ``done.json``. A disagreement beyond
:data:`~pneumoseg.inference.runtime.MAX_PROBABILITY_DIFFERENCE` or
:data:`~pneumoseg.inference.runtime.MAX_MASK_SHARE_DIFFERING` refuses the package.

Deploying it: serve it with :mod:`pneumoseg.serve.server` (locally, or in a bring-your-own SageMaker container), or
deploy it in SageMaker's PyTorch inference container, which installs ``code/requirements.txt`` and imports
``code/inference.py`` (the SDK's ``PyTorchModel(model_data=..., entry_point="inference.py", source_dir=<the
package's code/ folder>)``, or ``SAGEMAKER_PROGRAM=inference.py`` in the model's environment).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from pneumoseg import layout, stage_table
from pneumoseg.config import is_ensemble
from pneumoseg.data import labels as lb
from pneumoseg.data.testset import image_sizes, test_set
from pneumoseg.errors import DataError
from pneumoseg.evaluation.submission import score_submission, write_submission
from pneumoseg.inference.experiments import build_predictor, chosen_members
from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor, make_predictions
from pneumoseg.inference.runtime import ONNXRUNTIME, TORCH, Agreement, export_onnx, onnx_name, with_runtime
from pneumoseg.io import atomic_path, content_hash, read_png, write_json
from pneumoseg.reports import oof as oof_report
from pneumoseg.serve.package import (
    MANIFEST_FILE,
    add_onnx_models,
    build_manifest,
    load_package,
    open_package,
    source_files,
    write_package,
)
from pneumoseg.stages.predict import test_labels_path
from pneumoseg.stages.record import StageRecord

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
    members = chosen_members(cfg) if is_ensemble(cfg) else []
    predictor = build_predictor(cfg, device="cpu", runtime=TORCH)
    if isinstance(predictor, EnsemblePredictor):
        files = {
            f"{m.name}/{_package_name(_path(model), layout.train_dir(m.cfg))}": _path(model)
            for m, member in zip(members, predictor.members)
            for model in member.models
        }
    else:
        files = {_package_name(_path(model), layout.train_dir(cfg)): _path(model) for model in predictor.models}
    manifest = build_manifest(cfg, predictor, files)
    sources = source_files()
    # The package holds the whole resolved config and pneumoseg's code: a change to either (but to local paths)
    # rebuilds it, as a change to the weights or the post-processing does (they make the version).
    sections = [str(key) for key in cfg if key != "paths"]
    code = content_hash(*sources.values())
    record = StageRecord(
        STAGE_NAME, layout.package_dir(cfg), cfg, sections, inputs={"version": manifest["version"], "code": code}
    )
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()
    record.start()
    path = layout.package_path(cfg)
    with tempfile.TemporaryDirectory(prefix="pneumoseg-onnx-") as folder:
        onnx_files = export_models(files, predictor, Path(folder))
        add_onnx_models(manifest, onnx_files)
        onnx_predictor = _on_onnxruntime(predictor, [file for _, file in onnx_files.values()])
        manifest["onnx_check"] = check_onnx(cfg, predictor, onnx_predictor)
        with atomic_path(path) as tmp:
            write_package(
                tmp, cfg, manifest, {**files, **dict(onnx_files.values()), **sources}, {m.name: m.cfg for m in members}
            )
            verify_package(tmp, predictor, onnx_predictor)
    write_json(layout.package_dir(cfg) / MANIFEST_FILE, manifest)
    oof_report.add_runtime_check(layout.search_dir(cfg), manifest["onnx_check"])
    summary = {
        "package": str(path),
        "bytes": path.stat().st_size,
        "name": manifest["name"],
        "version": manifest["version"],
        "models": [m["file"] for m in manifest["models"]],
        "postprocess": manifest["postprocess"],
        "onnx_check": manifest["onnx_check"],
    }
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


def export_models(
    files: dict[str, Path], predictor: Predictor | EnsemblePredictor, folder: Path
) -> dict[str, tuple[str, Path]]:
    """Export each of the predictor's models to ONNX in ``folder``.

    Args:
        files: each model's checkpoint name in the package (in the order of ``predictor.models``) -> its file.
        predictor: the torch predictor.
        folder: where to write the ONNX files (a temporary folder).

    Returns:
        checkpoint name in the package -> the ONNX file's name in the package, and where it is written.
    """
    exported = {}
    for name, model in tqdm(list(zip(files, predictor.models)), desc="ONNX export", unit="model"):
        path = folder / onnx_name(name)
        export_onnx(model.net, model.image_size, model.normalize.channels, path)
        exported[name] = (onnx_name(name), path)
    return exported


def _on_onnxruntime(
    predictor: Predictor | EnsemblePredictor, onnx_files: Sequence[Path]
) -> Predictor | EnsemblePredictor:
    """The same predictor (TTA, ensemble, post-processing) with its models' ONNX exports on ONNX Runtime."""
    files = iter(onnx_files)

    def swapped(member: Predictor) -> Predictor:
        models = with_runtime(member.models, ONNXRUNTIME, [(next(files), None) for _ in member.models])
        return Predictor(models, member.tta, member.postprocessor, member.interpolation, member.batch_size, member.amp)

    if isinstance(predictor, Predictor):
        return swapped(predictor)
    return EnsemblePredictor(
        [swapped(member) for member in predictor.members], predictor.weights, predictor.postprocessor, predictor.names
    )


def check_onnx(
    cfg: DictConfig, predictor: Predictor | EnsemblePredictor, onnx_predictor: Predictor | EnsemblePredictor
) -> dict[str, Any]:
    """Predict the test images (stage 01's PNGs of stage 02's test list; :func:`synthetic_image` when there are none)
    with torch and with ONNX Runtime and compare (:class:`~pneumoseg.inference.runtime.Agreement`); with the held-out
    labels, score both submissions.

    Returns:
        The agreement's figures, where the images came from, and ``test_score_torch`` / ``test_score_onnxruntime``
        when the labels exist.

    Raises:
        DataError: ONNX Runtime disagrees beyond the tolerances (the package is refused).
    """
    agreement = Agreement()
    sources = _test_pngs(cfg, predictor)
    if sources is None:
        image = synthetic_image(predictor.image_size)
        agreement.add(predictor.predict([image]), onnx_predictor.predict([image]))
        agreement.check("the ONNX export")
        return {"images_from": "a synthetic image", **agreement.summary()}
    ids, sizes, folders = sources
    encoded: dict[str, list[str]] = {TORCH: [], ONNXRUNTIME: []}
    batch_size = max(member.batch_size for member in getattr(predictor, "members", [predictor]))
    for start in tqdm(range(0, len(ids), batch_size), desc="ONNX check (torch, onnxruntime)", unit="batch"):
        batch_ids = ids[start : start + batch_size]
        batches = {
            size: np.stack([read_png(folder / f"{i}.png") for i in batch_ids]) for size, folder in folders.items()
        }
        batch: Any = batches[predictor.image_size] if isinstance(predictor, Predictor) else batches
        shapes = [sizes[i] for i in batch_ids]
        expected = make_predictions(*predictor.probabilities_prepared(batch, shapes), predictor.postprocessor)
        found = make_predictions(*onnx_predictor.probabilities_prepared(batch, shapes), predictor.postprocessor)
        agreement.add(expected, found)
        for runtime, predictions in ((TORCH, expected), (ONNXRUNTIME, found)):
            encoded[runtime] += [p.rle(cfg.predict.fmt) for p in predictions]
    result = {"images_from": "the test set", **agreement.summary(), **_test_scores(cfg, ids, sizes, encoded)}
    log.info("ONNX Runtime against torch on %d test images: %s", len(ids), result)
    agreement.check("the ONNX export")
    return result


def _test_pngs(cfg: DictConfig, predictor: Predictor | EnsemblePredictor):
    """``(ids, original sizes, {size: PNG folder})`` of the test set, or None when stage 01-02 left none."""
    try:
        test, _ = test_set(cfg)
    except DataError:
        return None
    ids = test[lb.ID_COLUMN].tolist()
    folders = {size: layout.images_dir(cfg, size) for size in predictor.image_sizes}
    if not ids or not all((folder / f"{i}.png").is_file() for folder in folders.values() for i in ids):
        return None
    return ids, image_sizes(test), folders


def _test_scores(
    cfg: DictConfig, ids: list[str], sizes: dict[str, tuple[int, int]], encoded: dict[str, list[str]]
) -> dict[str, float]:
    """The challenge score of each runtime's submission on the held-out labels (none without them)."""
    labels = test_labels_path(cfg)
    if not labels.is_file():
        return {}
    scores = {}
    with tempfile.TemporaryDirectory(prefix="pneumoseg-onnx-check-") as folder:
        for runtime, rles in encoded.items():
            path = Path(folder) / f"{runtime}.csv"
            write_submission(path, ids, rles, None, sizes, cfg.predict.fmt)
            scores[f"test_score_{runtime}"] = round(score_submission(path, labels, sizes, cfg.predict.fmt), 6)
    return scores


def synthetic_image(size: int) -> np.ndarray:
    """A ``2 size`` px square test image: a smooth gradient with a bright disc, something for every view and threshold
    to respond to."""
    rows, cols = np.mgrid[0 : size * 2, 0 : size * 2]
    image = (rows + cols) * (127 / (4 * size)) + 120 * ((rows - size) ** 2 + (cols - size) ** 2 < (size / 2) ** 2)
    return image.astype(np.uint8)


def verify_package(
    path: Path, predictor: Predictor | EnsemblePredictor, onnx_predictor: Predictor | EnsemblePredictor
) -> None:
    """Extract the package, load it as the server does with each runtime, and check that it predicts a test image
    exactly as ``predictor`` (torch) and ``onnx_predictor`` (ONNX Runtime) do.

    Raises:
        RuntimeError: the predictions differ (a bug: the package does not hold what it should).
    """
    image = synthetic_image(predictor.image_size)
    with open_package(path) as model_dir:
        for runtime, reference in ((TORCH, predictor), (ONNXRUNTIME, onnx_predictor)):
            packaged = load_package(model_dir, device="cpu", runtime=runtime)
            [expected] = reference.predict([image])
            [found] = packaged.predictor.predict([image])
            if packaged.runtime != runtime or not (
                np.array_equal(expected.probs, found.probs) and np.array_equal(expected.mask, found.mask)
            ):
                raise RuntimeError(
                    f"the package {path} does not predict with {runtime} as the experiment's predictor "
                    f"does (runtime {packaged.runtime}, max difference "
                    f"{np.abs(expected.probs - found.probs).max():.3g})"
                )


def stage(cfg: DictConfig, args: argparse.Namespace) -> None:
    """The script's entry: run the stage and print where the package is and how to serve it."""
    summary = run(cfg, force=args.force)
    print(
        f"model package: {summary['package']} ({summary['bytes'] / 1e6:.1f} MB), version {summary['version']}\n"
        f"  {len(summary['models'])} models, post-processing {summary['postprocess']['name']} "
        f"{summary['postprocess']['params']}"
        + _onnx_text(summary.get("onnx_check"))
        + f"\n  serve it: python -m pneumoseg.serve --model {summary['package']} --port 8080"
    )


def _onnx_text(check: dict[str, Any] | None) -> str:
    """The ONNX check's line of the script's output."""
    if not check:
        return ""
    scores = (
        f"; test score {check['test_score_torch']:.4f} (torch), {check['test_score_onnxruntime']:.4f} (onnxruntime)"
        if "test_score_torch" in check
        else ""
    )
    return (
        f"\n  ONNX Runtime against torch on {check['images']} images ({check['images_from']}): probabilities "
        f"within {check['max_probability_difference']:.2g}, {check['mask_share_differing']:.2g} of mask pixels "
        f"differ, Dice between the submissions {check['dice_between_runtimes']:.4f}{scores}"
    )
