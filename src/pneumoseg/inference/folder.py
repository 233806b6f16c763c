"""``pneumoseg predict``: a folder of new chest X-rays in (DICOM, PNG, JPEG; no labels), masks, overlays, DICOM SEG
and a review page out::

    pneumoseg predict --model model.tar.gz --input xrays/ --output predictions/
    pneumoseg predict --model configs/demo.yaml --input xrays/ --output predictions/ [key=value ...]

``--model`` is a stage-06 package (``model.tar.gz`` or the folder it extracts to; an ensemble's too) or an
experiment or ensemble config whose stages 03-04 have finished (overrides as ``key=value``; an ensemble predicts
with the members its stage 04 chose). Either way the predictor is the one of stage 05, the server and the SageMaker
handler (:mod:`pneumoseg.inference.predictor`): the same TTA, fold ensemble, member blend, resizing and
post-processing, so the masks are those the submission and the endpoint give.

Outputs in ``--output``, written as the run goes:

* ``predictions.csv``: one row per image (:data:`COLUMNS`): its path under ``--input``, a DICOM's SOPInstanceUID and
  StudyInstanceUID, has_pneumothorax, the image-level probability (the highest pixel probability), the gate
  probability (models with the gate head), the mask's area in pixels and in mm2 (from PixelSpacing or
  ImagerPixelSpacing), EncodedPixels (the package's or config's run-length form, ``-1`` when empty), in_scope and a
  note (why an image is out of scope);
* ``masks/<path>.png``: the mask, 0 or 255, at the image's size;
* ``overlays/<path>.jpg``: the X-ray with the probability map and the mask's outline (:mod:`pneumoseg.reports.review`);
* ``seg/<path>.seg.dcm`` for a DICOM: a binary DICOM SEG referencing it (:mod:`pneumoseg.inference.dicom_seg`);
* ``probabilities/<path>.png`` with ``--probabilities``: the probability map as a 16-bit PNG (value / 65535);
* ``errors.csv``: the files that could not be read, and why;
* ``index.html``: the review page, written when the run ends.

Out of scope: a DICOM whose Modality is not CR, DX or DR, whose BodyPartExamined is not a chest, or whose
ViewPosition is lateral (:func:`pneumoseg.inference.sources.scope_note`) gets a row with in_scope false and the
reason, and is not predicted unless ``--include-out-of-scope``.

Scale: files are decoded in ``--workers`` processes, a bounded number ahead of the model, and predicted in batches of
``--batch-size``; nothing is kept per image beyond its batch. A killed run resumes where it stopped: the images in
``predictions.csv`` or ``errors.csv`` are skipped (delete ``errors.csv`` to retry the unreadable ones), and every
file is written atomically, its CSV row only after its outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from pneumoseg.config import fingerprint, is_ensemble, load_config
from pneumoseg.errors import ConfigError, DataError, PneumosegError
from pneumoseg.inference.experiments import build_predictor, chosen_members
from pneumoseg.inference.ledger import Ledger
from pneumoseg.inference.outputs import area_mm2, overlay_name, write_outputs
from pneumoseg.inference.predictor import EnsemblePredictor, Prediction, Predictor
from pneumoseg.inference.sources import ReadFailure, SourceImage, find_images, read_source
from pneumoseg.logs import setup_logging
from pneumoseg.reports.review import write_review_page
from pneumoseg.serve.package import load_package, open_package

log = logging.getLogger(__name__)

COLUMNS = (
    "source",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "has_pneumothorax",
    "probability",
    "gate_probability",
    "area_pixels",
    "area_mm2",
    "EncodedPixels",
    "in_scope",
    "note",
)
"""The columns of ``predictions.csv``."""
ERROR_COLUMNS = ("source", "error")
PREDICTIONS_FILE, ERRORS_FILE, REVIEW_FILE = "predictions.csv", "errors.csv", "index.html"
# The config sections a config-built model's version depends on (it seeds the DICOM SEGs' UIDs).
_MODEL_SECTIONS = ("model", "train", "tta", "postprocess", "predict")


@dataclass
class Model:
    """What predicts, and how its outputs name it: the predictor, the experiment's name, a version that changes
    with its weights or settings, and the run-length form of ``EncodedPixels``."""

    predictor: Predictor | EnsemblePredictor
    name: str
    version: str
    fmt: str


@contextlib.contextmanager
def open_model(spec: str | os.PathLike, overrides: Sequence[str] = (), device: str = "auto") -> Iterator[Model]:
    """The model of ``--model``: an experiment or ensemble config (``.yaml``/``.yml``, with ``overrides``) predicts
    with its finished stages 03-04, as stage 05 does (:func:`pneumoseg.inference.experiments.build_predictor`);
    anything else is a model package (an ensemble's too), extracted for the block's duration when it is an archive
    (:func:`pneumoseg.serve.package.load_package`).

    Args:
        spec: the config file or the package (``model.tar.gz`` or the folder it extracts to).
        overrides: ``key=value`` overrides of a config.
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        ConfigError: a bad config, or overrides given with a package.
        DataError: unfinished stages (of an ensemble's members too), or a missing or damaged package.
    """
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(path, overrides)
        predictor = build_predictor(cfg, device)
        yield Model(
            predictor, str(cfg.experiment), f"{cfg.experiment}-{config_version(cfg)[:12]}", str(cfg.predict.fmt)
        )
        return
    if overrides:
        raise ConfigError(
            f"config overrides {list(overrides)} were given, but --model {spec} is a package, not a "
            f"config; a package predicts as it was built"
        )
    with open_package(path) as folder:
        served = load_package(folder, device)
        yield Model(served.predictor, served.name, served.version, served.fmt)


def config_version(cfg: DictConfig) -> str:
    """A hash of what a config-built model predicts with: the config's prediction sections and, for an ensemble,
    each chosen member's weight and prediction sections (a member retrained with other settings changes it).

    Raises:
        DataError: as :func:`pneumoseg.inference.experiments.chosen_members`.
    """
    if not is_ensemble(cfg):
        return fingerprint(cfg, _MODEL_SECTIONS)
    members = {m.name: [m.weight, fingerprint(m.cfg, _MODEL_SECTIONS)] for m in chosen_members(cfg)}
    return fingerprint(cfg, _MODEL_SECTIONS, {"members": members})


def run(
    model: Model,
    input_dir: Path,
    output_dir: Path,
    batch_size: int = 8,
    workers: int = 1,
    probabilities: bool = False,
    include_out_of_scope: bool = False,
) -> dict[str, object]:
    """Predict every image under ``input_dir`` not yet done in ``output_dir``; see the module docstring.

    Args:
        model: from :func:`open_model`.
        input_dir: the images, found recursively.
        output_dir: where the outputs go (a run there before is resumed).
        batch_size: images predicted together.
        workers: decoding processes (0: decode in this process).
        probabilities: also write the probability maps.
        include_out_of_scope: predict out-of-scope DICOMs too.

    Returns:
        The summary: images found, predicted this run, positive, out of scope, unreadable, seconds per image.

    Raises:
        DataError: no input folder, or an output folder written by something else.
    """
    if batch_size < 1 or workers < 0:
        raise DataError(f"--batch-size must be at least 1 and --workers at least 0, got {batch_size} and {workers}")
    predictions = Ledger(output_dir / PREDICTIONS_FILE, COLUMNS)
    errors = Ledger(output_dir / ERRORS_FILE, ERROR_COLUMNS)
    found = list(find_images(input_dir))
    todo = [source for source in found if source not in predictions.sources and source not in errors.sources]
    log.info("%d images under %s, %d already done in %s", len(found), input_dir, len(found) - len(todo), output_dir)
    started = time.perf_counter()
    with _pool(workers) as pool, tqdm(total=len(todo), desc="predict", unit="img") as progress:
        writing = None  # the previous batch, its files being written while this one is predicted
        # Reads run two batches ahead, so that a batch's files are queued in the pool before the previous batch's
        # writes and are decoded while the model predicts.
        reading = read_images(pool, input_dir, todo, 2 * batch_size + 4 * workers, include_out_of_scope)
        for batch in _batches(reading, batch_size):
            predicted = predict_batch(model, batch, pool, output_dir, probabilities)
            if writing is not None:
                _record(*writing, predictions, errors, model.fmt)
            writing = (batch, predicted)
            progress.update(len(batch))
        if writing is not None:
            _record(*writing, predictions, errors, model.fmt)
    seconds = time.perf_counter() - started
    rows = predictions.rows()
    write_review_page(
        output_dir / REVIEW_FILE,
        [{**row, "overlay": _overlay_link(row)} for row in rows],
        errors.rows(),
        f"pneumothorax predictions: {model.name} ({model.version})",
    )
    return {
        "output": str(output_dir),
        "found": len(found),
        "predicted_now": len(todo),
        "positive": sum(row["has_pneumothorax"] == "true" for row in rows),
        "out_of_scope": sum(row["in_scope"] != "true" for row in rows),
        "unreadable": len(errors.sources),
        "seconds_per_image": round(seconds / len(todo), 4) if todo else None,
    }


class _Inline:
    """Runs each job at once in this process: the pool of ``--workers 0``."""

    @staticmethod
    def submit(function: Callable, *args) -> Future:
        future: Future = Future()
        future.set_result(function(*args))
        return future


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor | _Inline]:
    """The processes that read the images and write the outputs (none for 0 workers)."""
    if workers == 0:
        yield _Inline()
        return
    with ProcessPoolExecutor(workers, mp_context=_worker_context()) as pool:
        yield pool


def _worker_context() -> multiprocessing.context.ForkServerContext:
    """Where the workers come from: a fork server forks them from a clean process, not from this one, whose torch
    threads a fork would copy half-made; its preload imports the (torch-free) reader and writer once for all."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pneumoseg.inference.sources", "pneumoseg.inference.outputs"])
    return context


def start_worker_server() -> None:
    """Start the fork server now: its imports take seconds, which then pass while the model loads."""
    _worker_context()
    multiprocessing.forkserver.ensure_running()


def read_images(
    pool: ProcessPoolExecutor | _Inline, root: Path, sources: Sequence[str], ahead: int, include_out_of_scope: bool
) -> Iterator[SourceImage | ReadFailure]:
    """The images read in ``pool``, in order, at most ``ahead`` files ahead of the consumer, so that memory does
    not grow with the folder."""
    queued: deque[Future] = deque()
    for source in sources:
        queued.append(pool.submit(read_source, root, source, include_out_of_scope))
        if len(queued) > ahead:
            yield queued.popleft().result()
    while queued:
        yield queued.popleft().result()


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_batch(
    model: Model,
    batch: Sequence[SourceImage | ReadFailure],
    pool: ProcessPoolExecutor | _Inline,
    output_dir: Path,
    probabilities: bool,
) -> dict[str, tuple[Prediction, Future]]:
    """Predict the images of a batch that are to be predicted and start writing their files in ``pool``: each
    image's prediction and the job writing its files (whose result is a note), by source."""
    to_predict = [item for item in batch if isinstance(item, SourceImage) and item.pixels is not None]
    pixels = [image.pixels for image in to_predict if image.pixels is not None]
    predictions = model.predictor.predict(pixels) if pixels else []
    return {
        image.source: (
            prediction,
            pool.submit(
                write_outputs,
                image,
                prediction.probs,
                prediction.mask,
                output_dir,
                probabilities,
                model.name,
                model.version,
            ),
        )
        for image, prediction in zip(to_predict, predictions)
    }


def _record(
    batch: Sequence[SourceImage | ReadFailure],
    predicted: dict[str, tuple[Prediction, Future]],
    predictions: Ledger,
    errors: Ledger,
    fmt: str,
) -> None:
    """Once a batch's files are written, append its rows to ``predictions.csv`` and its failures to ``errors.csv``."""
    rows = []
    for image in batch:
        if isinstance(image, SourceImage):
            prediction, written = predicted.get(image.source, (None, None))
            note = "; ".join(filter(None, [image.note, written.result() if written is not None else ""]))
            rows.append(prediction_row(image, prediction, fmt, note))
    failures = [{"source": item.source, "error": item.error} for item in batch if isinstance(item, ReadFailure)]
    for failure in failures:
        log.warning("%s", failure["error"])
    errors.append(failures)
    predictions.append(rows)


def prediction_row(image: SourceImage, prediction: Prediction | None, fmt: str, note: str) -> dict[str, object]:
    """The ``predictions.csv`` row of an image; the prediction's columns are empty when it was not predicted."""
    row: dict[str, object] = {
        "source": image.source,
        "SOPInstanceUID": image.sop_instance_uid,
        "StudyInstanceUID": image.study_instance_uid,
        "in_scope": _flag(image.in_scope),
        "note": note,
    }
    if prediction is None:
        return {**row, **{column: "" for column in COLUMNS if column not in row}}
    return {
        **row,
        "has_pneumothorax": _flag(prediction.has_pneumothorax),
        "probability": f"{prediction.max_prob:.4f}",
        "gate_probability": "" if prediction.gate is None else f"{prediction.gate:.4f}",
        "area_pixels": prediction.area,
        "area_mm2": area_mm2(image, prediction.area),
        "EncodedPixels": prediction.rle(fmt),
    }


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _overlay_link(row: dict[str, str]) -> str:
    """The overlay of a predicted row, relative to the review page ("" when not predicted)."""
    return overlay_name(row["source"]) if row["EncodedPixels"] else ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pneumoseg predict",
        description="Predict a folder of chest X-rays (DICOM, PNG, JPEG, found recursively; no labels): "
        "predictions.csv, masks, overlays, DICOM SEG and a review page (index.html).",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a stage-06 package (model.tar.gz or its folder), or an experiment or ensemble config "
        "whose stages 03-04 have finished",
    )
    parser.add_argument("--input", required=True, type=Path, help="the folder of images")
    parser.add_argument("--output", required=True, type=Path, help="where the outputs go; a run there is resumed")
    parser.add_argument("--probabilities", action="store_true", help="also write the probability maps")
    parser.add_argument(
        "--include-out-of-scope",
        action="store_true",
        help="predict DICOMs that are not frontal chest radiographs too (flagged either way)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images predicted together (default 8)")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(4, (os.cpu_count() or 1) - 1)),
        help="decoding processes; 0 decodes in the main process (default: CPUs - 1, at most 4)",
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with a config)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command: parse ``argv`` (default: the command line), predict, print the summary; the exit code (0 done,
    1 an error named on stderr, 130 interrupted: rerun the same command to resume). Like every program that starts
    worker processes this way, a script calling it needs the ``if __name__ == "__main__":`` guard."""
    args = parse_args(argv)
    setup_logging()
    if args.workers > 0:
        start_worker_server()
    try:
        with open_model(args.model, args.overrides, args.device) as model:
            summary = run(
                model,
                args.input,
                args.output,
                args.batch_size,
                args.workers,
                args.probabilities,
                args.include_out_of_scope,
            )
    except PneumosegError as exc:
        log.error("%s", exc)
        return 1
    except BrokenProcessPool:
        log.error(
            "a worker process died (out of memory, or a decoder that crashed on a file); rerun the same "
            "command to resume, with --workers 0 to see which file stops it"
        )
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume where it stopped")
        return 130
    print(summary_text(summary))
    return 0


def summary_text(summary: dict[str, object]) -> str:
    """The lines the command prints when it is done."""
    speed = "" if summary["seconds_per_image"] is None else f", {summary['seconds_per_image']:.3f} s per image"
    return (
        f"predictions: {summary['output']}/{PREDICTIONS_FILE} (review page {summary['output']}/{REVIEW_FILE})\n"
        f"  {summary['found']} images found, {summary['predicted_now']} read this run{speed}; "
        f"{summary['positive']} with pneumothorax predicted, {summary['out_of_scope']} out of scope, "
        f"{summary['unreadable']} unreadable (errors.csv)"
    )
