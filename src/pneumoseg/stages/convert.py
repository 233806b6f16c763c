"""Stage 01: every challenge DICOM to 8-bit PNGs at each prepared size, plus a table of its tags.

Outputs in ``${paths.prepared_dir}/01_convert/``:

* ``images_<size>/<ImageId>.png`` for every size in ``prepare.sizes``: square, resized by OpenCV with
  ``prepare.interpolation``; ``images_<size>/resize.json`` holds the settings those PNGs were made with.
* ``metadata.csv``: one row per readable DICOM, the columns of :data:`pneumoseg.data.dicom.METADATA_KEYS`.
* ``errors.csv``: ``path, kind, reason`` for every DICOM that could not be read (``kind``: the
  :class:`pneumoseg.data.dicom.DicomError` subclass, such as ``TruncatedDicomError`` or ``TooLargeDicomError``).

A file that cannot become an image (of any kind: truncated, malformed, a decompression bomb, an image larger
than any radiograph) is listed in ``errors.csv`` and the stage goes on with the rest, unless ``prepare.strict``;
the reader refuses oversized images before decoding them, so no file can exhaust a worker's memory.

A file name in any bytes is read; its ImageId (and the PNG's name) writes a byte that is not UTF-8 as ``\\xNN``
(:func:`pneumoseg.data.dicom.printable_name`). A broken or self-looping link named ``*.dcm`` is an errors.csv row.

Train and test images alike are converted; stage 02 decides the split. The work is spread over
``prepare.n_jobs`` processes in batches. It resumes: an image whose PNGs are all whole (:func:`is_whole_png`:
signature, size and end marker; a zero-byte or cut file is redone) is not decoded again (its metadata comes from
the header alone), so a killed run continues where it stopped. Every PNG is written to a temporary file whose size
is checked before it is renamed. A full disk (or a write that stores fewer bytes than it should) ends the stage
with one DataError naming the folder; the PNGs finished before it are whole, so a rerun once space is freed gives
the outputs of a clean run. The stage reruns when the ``prepare`` section changes or the DICOM listing does (file
count or total size).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from joblib import Parallel, delayed, effective_n_jobs
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pneumoseg import layout, stage_table
from pneumoseg.data.dicom import METADATA_KEYS, DicomError, find_dicoms, read_dicom, read_dicom_header
from pneumoseg.data.resize import INTERPOLATIONS, resize_square
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import ShortWriteError, is_whole_png, write_csv, write_json, write_png
from pneumoseg.stage_table import run_first
from pneumoseg.stages.record import StageRecord

log = logging.getLogger(__name__)

STAGE_NAME = stage_table.stage("01").name
ERRORS_FILE = "errors.csv"
RESIZE_FILE = "resize.json"
# Bump when read_dicom or the resizing changes the pixels they produce, so old PNGs are not reused.
PNG_VERSION = 2  # 2: data of more than 8 bits shown through its VOI LUT or window

# Tasks of up to 32 images (a fraction of a second of work) make joblib's per-task cost of about a ms
# negligible; many tasks per worker keep every worker busy until the end.
MAX_BATCH = 32
TASKS_PER_WORKER = 16

INPUT_HINT = (
    "Put the challenge's DICOM folders there (dicom-images-train/ and dicom-images-test/, or "
    f"stage_2_images/), or for the demo data {run_first('00')}."
)


@dataclass(frozen=True)
class ConvertSettings:
    """The ``prepare`` section, checked.

    Args:
        sizes: the square PNG sizes to write, in pixels.
        interpolation: a name in :data:`INTERPOLATIONS`.
        n_jobs: joblib workers (-1: every core).
        strict: whether one unreadable DICOM fails the stage.
    """

    sizes: tuple[int, ...]
    interpolation: str
    n_jobs: int
    strict: bool

    @classmethod
    def from_config(cls, prepare: DictConfig) -> ConvertSettings:
        sizes = tuple(prepare.sizes) if OmegaConf.is_list(prepare.sizes) else ()
        if not sizes or not all(isinstance(size, int) and size > 0 for size in sizes):
            raise ConfigError(
                f"prepare.sizes must be a list of positive whole numbers of pixels, got {prepare.sizes!r}"
            )
        if prepare.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"prepare.interpolation {prepare.interpolation!r} is unknown; use one of {', '.join(INTERPOLATIONS)}"
            )
        if not isinstance(prepare.n_jobs, int) or prepare.n_jobs == 0:
            raise ConfigError(
                f"prepare.n_jobs must be a non-zero whole number (-1: every core), got {prepare.n_jobs!r}"
            )
        return cls(tuple(dict.fromkeys(sizes)), prepare.interpolation, prepare.n_jobs, bool(prepare.strict))


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Convert every DICOM under ``paths.input_dir``; see the module docstring for the outputs.

    Args:
        cfg: the resolved config; the stage reads ``paths`` and ``prepare``.
        force: redo the stage, rewriting every PNG, even when its outputs are complete.

    Returns:
        The summary: ``images`` (readable, listed in metadata.csv), of which ``converted`` (decoded in
        this run) and ``reused`` (PNGs already there); ``failed`` (listed in errors.csv); ``sizes``.

    Raises:
        DataError: no input folder or no DICOMs in it, two DICOMs with one ImageId, no readable DICOM at all,
            or any unreadable one when ``prepare.strict`` is true.
        ConfigError: a bad ``prepare`` section.
    """
    settings = ConvertSettings.from_config(cfg.prepare)
    input_dir = Path(cfg.paths.input_dir)
    dicoms = _list_dicoms(input_dir)
    folder = layout.convert_dir(cfg)
    record = StageRecord(STAGE_NAME, folder, cfg, ("prepare",), inputs=_listing_facts(input_dir, dicoms))
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()
    record.start()

    outputs = [(size, layout.images_dir(cfg, size)) for size in settings.sizes]
    with _write_failures_named(folder):
        for size, images in outputs:
            _claim_images_folder(
                images, {"size": size, "interpolation": settings.interpolation, "png_version": PNG_VERSION}
            )
        outcomes = _convert_all(dicoms, outputs, settings, overwrite=force)
        summary, errors = _write_tables(cfg, outcomes, settings.sizes)
    _check_outcome(summary, errors, settings.strict, input_dir, folder / ERRORS_FILE)
    record.finish(summary)
    return summary


@contextlib.contextmanager
def _write_failures_named(folder: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT, or a write that stored fewer bytes than it should), met in this process
    or a worker, into one DataError naming ``folder``: the PNGs written before it are whole, and a rerun goes on
    from them."""
    try:
        yield
    except (OSError, ShortWriteError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(
            f"{STAGE_NAME} stopped: the disk holding {folder} is full ({exc}). Free space and rerun; "
            f"the images converted so far are kept."
        ) from None


def _write_tables(cfg: DictConfig, outcomes: list[tuple[str, dict]], sizes: tuple[int, ...]) -> tuple[dict, list]:
    """Write metadata.csv and errors.csv (sorted, so reruns give identical files); return the summary and
    the error rows."""
    counts = Counter(status for status, _ in outcomes)
    rows = sorted((row for status, row in outcomes if status != "failed"), key=lambda row: row["ImageId"])
    errors = sorted((row for status, row in outcomes if status == "failed"), key=lambda row: row["path"])
    metadata = pd.DataFrame(rows, columns=list(METADATA_KEYS))
    write_csv(layout.metadata_path(cfg), metadata.astype({"rows": "Int64", "cols": "Int64", "age": "Int64"}))
    write_csv(layout.convert_dir(cfg) / ERRORS_FILE, pd.DataFrame(errors, columns=["path", "kind", "reason"]))
    summary = {
        "images": len(rows),
        "converted": counts["converted"],
        "reused": counts["reused"],
        "failed": len(errors),
        "sizes": list(sizes),
    }
    log.info(
        "%s: %d images ready (%d converted, %d already there), %d unreadable",
        STAGE_NAME,
        len(rows),
        counts["converted"],
        counts["reused"],
        len(errors),
    )
    return summary, errors


def _check_outcome(summary: dict, errors: list[dict], strict: bool, input_dir: Path, errors_path: Path) -> None:
    """Fail when no image is usable, or when any is not and ``strict``; otherwise warn about the failures."""
    total = summary["images"] + summary["failed"]
    if not summary["images"]:
        raise DataError(
            f"none of the {total} DICOM files under {input_dir} could be read; the reasons are in {errors_path}"
        )
    if not errors:
        return
    first = errors[0]
    if strict:
        raise DataError(
            f"{len(errors)} of {total} DICOM files could not be read and prepare.strict is true "
            f"(first: {first['path']}: {first['reason']}; all in {errors_path}). Fix or remove them, "
            f"or set prepare.strict=false to go on without them."
        )
    log.warning(
        "%s: %d DICOM files could not be read and are left out (first: %s: %s); all in %s",
        STAGE_NAME,
        len(errors),
        first["path"],
        first["reason"],
        errors_path,
    )


def _list_dicoms(input_dir: Path) -> dict[str, Path]:
    if not input_dir.is_dir():
        raise DataError(f"input folder {input_dir} (paths.input_dir) does not exist. {INPUT_HINT}")
    dicoms = find_dicoms(input_dir)
    if not dicoms:
        raise DataError(f"no .dcm files under {input_dir} (paths.input_dir). {INPUT_HINT}")
    return dicoms


def _listing_facts(input_dir: Path, dicoms: dict[str, Path]) -> dict:
    """A cheap fingerprint of the input: its folder, file count and total size (no file is read)."""
    return {
        "input_dir": str(input_dir.resolve()),
        "dicom_files": len(dicoms),
        "dicom_bytes": sum(_size(path) for path in dicoms.values()),
    }


def _size(path: Path) -> int:
    """The size of the file ``path`` names; 0 for a broken or looping link (its reading fails later, into
    errors.csv) or an entry that has gone."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _claim_images_folder(images: Path, settings: dict) -> None:
    """Make sure every PNG in ``images`` is made with ``settings``.

    A folder made with other settings, or without a settings file (a run killed right after creating it),
    is emptied first: resuming must never keep PNGs that the current settings would draw differently.
    """
    marker = images / RESIZE_FILE
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError):
        stored = None
    if stored == settings:
        return
    if images.exists():
        log.info("%s: %s was written with other settings (%s); rewriting it", STAGE_NAME, images, stored)
        shutil.rmtree(images)
    write_json(marker, settings)


def _convert_all(
    dicoms: dict[str, Path], outputs: list[tuple[int, Path]], settings: ConvertSettings, overwrite: bool
) -> list[tuple[str, dict]]:
    """Convert every DICOM in batches over ``settings.n_jobs`` processes; one (status, row) per DICOM."""
    items = list(dicoms.items())
    workers = effective_n_jobs(settings.n_jobs)
    batch = max(1, min(MAX_BATCH, math.ceil(len(items) / (workers * TASKS_PER_WORKER))))
    tasks = (
        delayed(_convert_batch)(items[start : start + batch], outputs, settings.interpolation, overwrite)
        for start in range(0, len(items), batch)
    )
    outcomes: list[tuple[str, dict]] = []
    with tqdm(total=len(items), desc=STAGE_NAME, unit="image") as progress:
        for results in Parallel(n_jobs=settings.n_jobs, return_as="generator_unordered")(tasks):
            outcomes.extend(results)
            progress.update(len(results))
    return outcomes


def _convert_batch(
    items: list[tuple[str, Path]], outputs: list[tuple[int, Path]], interpolation: str, overwrite: bool
) -> list[tuple[str, dict]]:
    """Convert a batch of ``(ImageId, path)`` in one worker.

    Returns one ``(status, row)`` per image: ``("converted", metadata)``, ``("reused", metadata)`` when every
    PNG already exists (and ``overwrite`` is false), or ``("failed", {"path", "kind", "reason"})``: the reader
    raises only DicomErrors, whatever a file holds.
    """
    results = []
    for image_id, path in items:
        targets = [(size, images / f"{image_id}.png") for size, images in outputs]
        try:
            if not overwrite and all(is_whole_png(target, size, size) for size, target in targets):
                results.append(("reused", read_dicom_header(path)))
                continue
            pixels, metadata = read_dicom(path)
        except DicomError as exc:
            results.append(("failed", {"path": exc.path, "kind": type(exc).__name__, "reason": exc.reason}))
            continue
        for size, target in targets:
            write_png(target, resize_square(pixels, size, interpolation))
        results.append(("converted", metadata))
    return results


def stage(cfg: DictConfig, args: argparse.Namespace) -> dict:
    """The script's entry: :func:`run` with the command line's ``--force``."""
    return run(cfg, force=args.force)
