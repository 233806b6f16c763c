"""Stage 05: predict every test image with the fold ensemble and write the challenge submission.

Inputs: stage 02's ``02_labels/test_images.csv`` (ImageId, rows, cols: the test set, in the sample submission's
order when there is one), stage 01's PNGs of those images at the models' size, stage 03's fold checkpoints and
stage 04's ``thresholds.json`` (see :meth:`pneumoseg.inference.predictor.Predictor.from_experiment` for how the config
chooses among them).

Outputs in ``${paths.experiment_dir}/05_predict/``:

* ``submission.csv``: ``ImageId,EncodedPixels``, one row per test image (``-1`` when empty), in ``predict.fmt``,
  validated before it is written (see :mod:`pneumoseg.evaluation.submission`);
* ``image_scores.csv``: ``ImageId, score, positive``: each test image's image-level score (the probability the
  post-processing decides it on, :meth:`pneumoseg.postprocess.strategies.PostProcessor.score`) and whether its
  mask is non-empty;
* ``test_score.json``, only when ``paths.input_dir`` holds the demo's held-out ``test_labels.csv``: the
  submission's challenge score beside the out-of-fold score of ``04_search/oof_report.json``, and the image-level
  AUC, sensitivity and specificity; with it ``test_report.md`` (and ``.json``, figures in ``plots/``): the test
  set judged as a detector, as the OOF report's section (:mod:`pneumoseg.reports.detection`);
* ``config.yaml`` and ``done.json``.

On an ensemble config the models are those of the members stage 04 chose (``04_search/ensemble.json``), each member
predicting its own PNGs (its ``train.image_size``) with its own folds and TTA; the maps are blended at each image's
original size with the weights and post-processed with the ensemble's ``thresholds.json``
(:class:`pneumoseg.inference.predictor.EnsemblePredictor`). Either predictor is built by
:func:`pneumoseg.inference.experiments.build_predictor`, as stage 06 and ``pneumoseg predict --model CONFIG`` build it.

Images stream through in batches of ``predict.batch_size``; only each image's run-length string is kept, so
memory does not grow with the test set. The stage reruns when the config sections the predictions depend on
change, or when a checkpoint, ``thresholds.json``, stage 01's record, the test list or the test labels do.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from pneumoseg import layout, stage_table
from pneumoseg.config import fingerprint, is_ensemble
from pneumoseg.data import labels as lb
from pneumoseg.data import rle
from pneumoseg.data.dataset import ImageFiles, make_loader
from pneumoseg.data.testset import image_sizes, test_set
from pneumoseg.demo.layouts import TEST_LABELS
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.evaluation import sanity
from pneumoseg.evaluation.submission import DEFAULT_SIZE, dice_by_image, score_submission, write_submission
from pneumoseg.inference.experiments import build_predictor, chosen_members
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor
from pneumoseg.io import content_hash, write_csv, write_json, write_text
from pneumoseg.modeling.checkpoints import best_files
from pneumoseg.modeling.device import set_cpu_threads
from pneumoseg.reports import detection as detection_report
from pneumoseg.reports import oof as oof_report
from pneumoseg.stage_table import DONE_FILE, command, require_finished
from pneumoseg.stages.record import StageRecord
from pneumoseg.stages.search import detector_numbers, extra_metadata

log = logging.getLogger(__name__)

STAGE_NAME = stage_table.stage("05").name
TEST_SCORE_FILE = "test_score.json"
IMAGE_SCORES_FILE = "image_scores.csv"
TEST_REPORT_JSON, TEST_REPORT_MD = "test_report.json", "test_report.md"
SECTIONS = ("data", "prepare", "model", "train", "tta", "postprocess", "predict", "report")


def test_labels_path(cfg: DictConfig) -> Path:
    """Where the demo keeps its held-out test labels (absent for the real challenge data)."""
    return Path(cfg.paths.input_dir) / TEST_LABELS


def _file_facts(paths: list[Path]) -> dict[str, list[int] | None]:
    """Size and modification time of each file (None when absent): enough to see that one was rewritten."""
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None for p in paths}


def _checkpoint_files(cfg: DictConfig) -> list[Path]:
    """Every checkpoint of an experiment's ``predict.checkpoints`` set.

    Raises:
        DataError: stage 03 has not finished (its ``done.json`` is missing).
    """
    train_dir = layout.train_dir(cfg)
    require_finished(train_dir, "03")
    return [
        path
        for folder in layout.fold_dirs(train_dir).values()
        for path in best_files(layout.checkpoints_dir(folder, str(cfg.predict.checkpoints)))
    ]


def _input_facts(cfg: DictConfig, test_labels: Path) -> dict[str, Any]:
    """What the predictions depend on besides the config: the files of stages 01-04 and the test labels; on an
    ensemble, its choice and each chosen member's checkpoints and prediction sections.

    Raises:
        DataError: stage 03 (of a chosen member) has not finished, or stage 04 has not chosen an ensemble's members.
    """
    files = [
        layout.thresholds_path(cfg),
        layout.convert_dir(cfg) / DONE_FILE,
        layout.test_images_path(cfg),
        test_labels,
    ]
    if not is_ensemble(cfg):
        return _file_facts(_checkpoint_files(cfg) + files)
    members = chosen_members(cfg)
    checkpoints = [path for m in members for path in _checkpoint_files(m.cfg)]
    return {
        "members": {m.name: fingerprint(m.cfg, SECTIONS) for m in members},
        **_file_facts(checkpoints + files + [layout.ensemble_path(cfg)]),
    }


def run(cfg: DictConfig, force: bool = False) -> dict[str, Any]:
    """Predict the test set and write the submission; see the module docstring.

    Returns:
        The summary: images, positive predictions, models and views per image, the post-processing, the
        device, seconds per image, the submission's path, and the test and OOF scores when the test labels exist.

    Raises:
        DataError: a missing input of stages 01-04, or a submission that does not validate.
        ConfigError: a bad ``predict`` section.
    """
    if cfg.predict.fmt not in rle.FORMATS:
        raise ConfigError(f"predict.fmt must be one of {', '.join(rle.FORMATS)}, not {cfg.predict.fmt!r}")
    folder = layout.predict_dir(cfg)
    test, expected = test_set(cfg)
    test_labels = test_labels_path(cfg)
    record = StageRecord(STAGE_NAME, folder, cfg, SECTIONS, inputs=_input_facts(cfg, test_labels))
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()
    threads = set_cpu_threads(cfg.predict.get("torch_threads"), "predict.torch_threads", int(cfg.predict.num_workers))
    predictor = build_predictor(cfg)
    record.start()

    ids = test[lb.ID_COLUMN].tolist()
    sizes = image_sizes(test)
    log.info(
        "%s: %d test images, %d models, %d forward passes per image on %s (%s, %d torch threads)",
        STAGE_NAME,
        len(ids),
        len(predictor.models),
        predictor.n_views,
        predictor.device,
        predictor.runtime,
        threads,
    )
    started = time.time()
    folders = {size: layout.images_dir(cfg, size) for size in predictor.image_sizes}
    encoded, counts, scores = predict_rles(predictor, folders, ids, sizes, cfg.predict)
    seconds = time.time() - started
    write_submission(layout.submission_path(cfg), ids, encoded, expected, sizes, cfg.predict.fmt)
    write_csv(
        folder / IMAGE_SCORES_FILE,
        pd.DataFrame({lb.ID_COLUMN: ids, "score": scores, "positive": [code != rle.EMPTY for code in encoded]}),
    )
    summary = {
        "submission": str(layout.submission_path(cfg)),
        "images": len(ids),
        **counts,
        "models": len(predictor.models),
        "views_per_model": round(predictor.n_views / len(predictor.models), 2),
        "postprocess": predictor.postprocessor.to_block(),
        "fmt": cfg.predict.fmt,
        "device": str(predictor.device),
        "runtime": predictor.runtime,
        "seconds_per_image": round(seconds / len(ids), 4),
    }
    if test_labels.is_file():
        summary.update(score_test_set(cfg, test_labels, sizes))
    summary[sanity.WARNINGS_KEY] = sanity.log_warnings(STAGE_NAME, sanity.prediction_warnings(summary))
    record.finish(summary)
    return summary


def predict_rles(
    predictor: Predictor | EnsemblePredictor,
    images_dirs: Mapping[int, Path],
    ids: list[str],
    sizes: dict[str, tuple[int, int]],
    settings: DictConfig,
) -> tuple[list[str], dict[str, int], list[float]]:
    """The run-length string of each image of ``ids`` (in order), counts: ``positive`` (non-empty masks) and,
    with a gated post-processing, ``gate_emptied`` (images the gate emptied that the mask strategy alone would have
    marked), and each image's image-level score (:meth:`pneumoseg.postprocess.strategies.PostProcessor.score`).

    Args:
        predictor: the fold ensemble, or an ensemble of experiments.
        images_dirs: stage 01's PNGs at each of the predictor's ``image_sizes``.
        ids: the test ImageIds.
        sizes: ``(rows, cols)`` of each original image.
        settings: the ``predict`` section (``batch_size``, ``num_workers``, ``fmt``).

    Raises:
        DataError: a test image without its PNG.
    """
    loaders = {}
    for size, folder in images_dirs.items():
        paths = [folder / f"{i}.png" for i in ids]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise DataError(
                f"{len(absent)} test images have no PNG in {folder}, e.g. {absent[0]}; rerun "
                f"{command('01')} (with {size} among prepare.sizes)"
            )
        loaders[size] = make_loader(
            ImageFiles(paths), int(settings.batch_size), int(settings.num_workers), predictor.device
        )
    encoded: list[str] = []
    scores: list[float] = []
    positive, gate_emptied = 0, 0
    with tqdm(total=len(ids), desc="test images", unit="img") as progress:
        for batches in zip(*loaders.values()):
            # A single experiment takes its one batch as it is; an ensemble takes the batch of each member size.
            batch = batches[0] if isinstance(predictor, Predictor) else dict(zip(loaders, batches))
            batch_ids = ids[len(encoded) : len(encoded) + len(batches[0])]
            for prediction in predictor.predict_prepared(batch, [sizes[i] for i in batch_ids]):
                encoded.append(prediction.rle(settings.fmt))
                scores.append(predictor.postprocessor.score(prediction.probs, prediction.gate))
                positive += prediction.has_pneumothorax
                gate_emptied += prediction.emptied_by_gate
            progress.update(len(batch_ids))
    counts = {"positive": positive}
    if predictor.postprocessor.needs_gate:
        counts["gate_emptied"] = gate_emptied
    return encoded, counts, scores


def score_test_set(cfg: DictConfig, test_labels: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Score the submission on the held-out labels, log it beside the OOF score and write ``test_score.json``."""
    test_score = score_submission(layout.submission_path(cfg), test_labels, sizes, cfg.predict.fmt)
    report = layout.oof_report_path(cfg)
    oof_score = json.loads(report.read_text())["oof_score"] if report.is_file() else None
    scores = {
        "test_score": round(test_score, 4),
        "oof_score": None if oof_score is None else round(oof_score, 4),
        "test_labels": str(test_labels),
        "labels_sha256": content_hash(test_labels),
    }
    detector = test_report(cfg, test_labels, sizes)
    scores.update(detector_headline(detector))
    write_json(layout.predict_dir(cfg) / TEST_SCORE_FILE, scores)
    oof_report.add_test_score(layout.search_dir(cfg), test_score, len(sizes))
    if oof_score is None:
        log.info("test score %.4f (no OOF report at %s to compare with)", test_score, report)
    else:
        log.info("test score %.4f, OOF score %.4f (difference %+.4f)", test_score, oof_score, test_score - oof_score)
    return {
        "test_score": scores["test_score"],
        "oof_score": scores["oof_score"],
        "test_empty_baseline": round(sanity.empty_baseline(test_labels), 4),
        **detector_headline(detector),
    }


def detector_headline(numbers: dict[str, Any]) -> dict[str, float | None]:
    """The image-level AUC, sensitivity and specificity of a detector report, for summaries and the leaderboard."""
    return {
        "test_auc": numbers["auc"],
        **{f"test_{key}": numbers["operating_point"][key]["value"] for key in ("sensitivity", "specificity")},
    }


def test_report(cfg: DictConfig, test_labels: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Judge the submission as a detector on the held-out labels: write ``test_report.md``, ``.json`` and the
    figures into stage 05's folder; returns the numbers."""
    folder = layout.predict_dir(cfg)
    dice = dice_by_image(layout.submission_path(cfg), test_labels, sizes, cfg.predict.fmt)
    labels = lb.read_labels(test_labels)
    scores = pd.read_csv(folder / IMAGE_SCORES_FILE, dtype={lb.ID_COLUMN: str}).set_index(lb.ID_COLUMN)
    ids = list(dice.index)
    frame = pd.DataFrame(
        {
            lb.ID_COLUMN: ids,
            "dice": dice.to_numpy(),
            "true_area": [int(labels[i].mask(*sizes.get(i, DEFAULT_SIZE)).sum()) for i in ids],
            "pred_area": scores.loc[ids, "positive"].astype(int).to_numpy(),
            "score": scores.loc[ids, "score"].to_numpy(),
        }
    )
    frame = detection_report.with_metadata(frame, layout.metadata_path(cfg), extra_metadata(cfg))
    numbers = detector_numbers(frame, cfg, cfg)
    plots = detection_report.write_plots(folder / oof_report.PLOTS, frame, numbers)
    write_json(folder / TEST_REPORT_JSON, numbers)
    lines = [
        "# Test report",
        "",
        f"The submission scored on the held-out labels `{test_labels}`: challenge dice "
        f"{frame['dice'].mean():.4f} over {len(frame)} images.",
        "",
        *detection_report.markdown_lines(numbers, plots, oof_report.PLOTS),
    ]
    write_text(folder / TEST_REPORT_MD, "\n".join(lines))
    return numbers


def summary_text(summary: dict[str, Any]) -> str:
    """The few lines the script prints when it is done."""
    lines = [
        f"submission: {summary['submission']}",
        f"  {summary['images']} test images, {summary['positive']} with pneumothorax predicted"
        + (f" ({summary['gate_emptied']} more emptied by the gate)" if "gate_emptied" in summary else ""),
        f"  {summary['models']} models x {summary['views_per_model']:g} views, post-processing "
        f"{summary['postprocess']['name']} {summary['postprocess']['params']}, "
        f"{summary['seconds_per_image']:.3f} s per image on {summary['device']} "
        f"with {summary.get('runtime', 'torch')}",
    ]
    if "test_score" in summary:
        oof = "n/a" if summary["oof_score"] is None else f"{summary['oof_score']:.4f}"
        lines.append(f"  test score {summary['test_score']:.4f} (held-out labels), OOF score {oof}")
        if summary.get("test_auc") is not None:
            lines.append(
                f"  image-level AUC {summary['test_auc']:.3f}, sensitivity {summary['test_sensitivity']:.3f}, "
                f"specificity {summary['test_specificity']:.3f} (test_report.md)"
            )
    lines += [f"  WARNING: {warning}" for warning in summary.get(sanity.WARNINGS_KEY, [])]
    return "\n".join(lines)


def stage(cfg: DictConfig, args: argparse.Namespace) -> None:
    """The script's entry: run the stage and print its summary."""
    print(summary_text(run(cfg, force=args.force)))
