"""Stage 02: labels -> training masks, cross-validation folds, the list of test images and a data report.

Reads stage 01's ``metadata.csv`` (one row per readable DICOM) and the challenge's label file
(``data.train_labels``), and writes ``${paths.prepared_dir}/02_labels/``:

* ``masks_<size>/<ImageId>.png``: the mask (0/255) of every training image at every size of
  ``prepare.sizes``, resized like the images (see :func:`pneumoseg.data.resize.resize_mask`);
* ``labels.csv``: ImageId, has_mask, n_instances, mask_area (original pixels), rows, cols;
* ``test_images.csv``: ImageId, rows, cols, in the sample submission's order when there is one;
* ``unmatched.csv``: ImageId, reason, detail for every image or label row that is neither train nor test;
* ``folds.csv``: ImageId, fold, has_mask, area_bin [, group] (see :func:`pneumoseg.data.folds.assign_folds`);
* ``data_report.md`` and ``report/*.png`` (see :mod:`pneumoseg.reports.data`).

Split rule: an image with a label row is "train". Otherwise it is "test" when it is in the sample submission
or, without a sample submission, when a folder on its path below ``paths.input_dir`` has "test" in its name
(stage 1's ``dicom-images-test``). Anything else is listed in ``unmatched.csv``, never dropped silently.

Masks already written are kept when the stage is rerun after an interruption; they are all rewritten with
``--force`` or when the label file or metadata changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from joblib import Parallel, delayed
from omegaconf import DictConfig
from tqdm import tqdm

from pneumoseg import layout, stage_table
from pneumoseg.data import folds as fold_split
from pneumoseg.data import inputs
from pneumoseg.data import labels as lb
from pneumoseg.data.dicom import DICOM_IDS, METADATA_KEYS
from pneumoseg.data.resize import resize_mask
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import content_hash, write_csv, write_png, write_text
from pneumoseg.reports import data as data_report
from pneumoseg.stage_table import command
from pneumoseg.stages.record import StageRecord

log = logging.getLogger(__name__)

STAGE_NAME = stage_table.stage("02").name
MASKS_KEY_FILE = "masks.key"
CHUNK = 256  # images per parallel task: enough work to outweigh the cost of sending it to a worker

NO_LABEL = "image without a label row"
NO_IMAGE = "label rows without an image"
SUBMISSION_NO_IMAGE = "in the sample submission, but no image"


@dataclass(frozen=True)
class Split:
    """The images of the stage split by the rule in the module docstring.

    Args:
        train: metadata rows of the labelled images, in metadata order.
        test: ImageId, rows, cols of the test images.
        unmatched: ImageId, reason, detail of everything else.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    unmatched: pd.DataFrame


def prepared_sizes(cfg: DictConfig) -> list[int]:
    """``prepare.sizes`` as distinct ints, in order."""
    return list(dict.fromkeys(int(size) for size in cfg.prepare.sizes))


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Run stage 02 (see the module docstring) and return its summary.

    Args:
        cfg: the resolved config; reads paths, data, prepare.sizes, prepare.n_jobs and folds.
        force: redo the stage and rewrite every mask even if its outputs are complete.

    Raises:
        DataError: stage 01's metadata or the label file is missing, or a label row is malformed (the message
            names the file, line and ImageId).
        ConfigError: a bad ``folds`` setting.
    """
    folder = layout.labels_dir(cfg)
    input_dir = Path(cfg.paths.input_dir)
    metadata_path = layout.metadata_path(cfg)
    labels_path = inputs.locate_train_labels(cfg.data.train_labels, input_dir)
    submission_path = inputs.locate_sample_submission(cfg.data.sample_submission, input_dir)
    sizes = prepared_sizes(cfg)
    metadata = read_metadata(metadata_path)
    digests = {
        "labels": content_hash(labels_path),
        "metadata": content_hash(metadata_path),
        "sample_submission": content_hash(submission_path) if submission_path else None,
    }
    record = StageRecord(STAGE_NAME, folder, cfg, sections=("data", "folds"), inputs={"sizes": sizes, **digests})
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()
    record.start()

    labels = lb.read_labels(labels_path)
    log.info(
        "%s: %d label rows of %d images from %s",
        STAGE_NAME,
        sum(x.n_rows for x in labels.values()),
        len(labels),
        labels_path,
    )
    submission = lb.read_image_ids(submission_path) if submission_path else None
    split = split_images(metadata, labels, submission, input_dir)
    table = label_table(split.train, labels)
    # Folds before masks: a bad folds setting should fail in seconds, not after the long part.
    folds = make_folds(cfg, table, metadata)
    balance = fold_split.fold_balance(folds, table["mask_area"], cfg.folds.area_bins)

    mask_key = f"{digests['labels']} {digests['metadata']}"
    written, kept = write_masks(cfg, table, labels, sizes, force, mask_key)

    write_csv(layout.labels_path(cfg), table)
    write_csv(layout.test_images_path(cfg), split.test)
    write_csv(layout.unmatched_path(cfg), split.unmatched)
    write_csv(layout.folds_path(cfg), folds)
    data_report.write_report(cfg, sizes, cfg.folds.area_bins, seed=int(cfg.folds.seed))

    summary = {
        "label_file": str(labels_path),
        "sample_submission": str(submission_path) if submission_path else None,
        "train_images": len(table),
        "positive_images": int(table["has_mask"].sum()),
        "test_images": len(split.test),
        "unmatched": {str(k): int(v) for k, v in split.unmatched["reason"].value_counts().items()},
        "masks_written": written,
        "masks_kept": kept,
        "sizes": sizes,
        "fold_balance": balance.to_dict("records"),
    }
    record.finish(summary)
    return summary


def format_balance(summary: dict) -> str:
    """The per-fold balance of a :func:`run` summary as an aligned text table."""
    table = pd.DataFrame(summary["fold_balance"]).to_string(index=False)
    return f"per-fold balance (images per mask-area bin; areas in original pixels):\n{table}"


def read_metadata(path: Path) -> pd.DataFrame:
    """Stage 01's ``metadata.csv``, with ImageId, source_path and the DICOM identifiers as strings.

    Raises:
        DataError: the file is missing, lacks a column this stage needs, or repeats an ImageId.
    """
    if not path.is_file():
        raise DataError(f"{path} not found: run stage 01 first ({command('01')})")
    # Identifiers stay text: a numeric PatientID read as a number would lose leading zeros.
    metadata = pd.read_csv(path, dtype={key: str for key in (lb.ID_COLUMN, "source_path", *DICOM_IDS)})
    missing = [c for c in (lb.ID_COLUMN, "source_path", "rows", "cols") if c not in metadata.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)}: rerun stage 01 with --force")
    duplicated = metadata[lb.ID_COLUMN][metadata[lb.ID_COLUMN].duplicated()]
    if len(duplicated):
        raise DataError(f"{path} lists ImageId {duplicated.iloc[0]} twice: rerun stage 01 with --force")
    return metadata


def split_images(
    metadata: pd.DataFrame, labels: dict[str, lb.ImageLabels], submission: list[str] | None, input_dir: Path
) -> Split:
    """Split stage 01's images into train, test and unmatched by the rule in the module docstring.

    Args:
        metadata: :func:`read_metadata` output.
        labels: :func:`pneumoseg.data.labels.read_labels` output.
        submission: the sample submission's ImageIds in order, or ``None`` without one.
        input_dir: ``paths.input_dir``, against which source paths are read for test folders.
    """
    ids = metadata[lb.ID_COLUMN]
    labelled = ids.isin(labels.keys())
    train = metadata[labelled]
    if submission is None:
        roots = (input_dir, input_dir.resolve())
        is_test = ~labelled & metadata["source_path"].map(lambda path: _in_test_folder(path, roots))
        test = metadata[is_test]
    else:
        order = {image_id: rank for rank, image_id in enumerate(submission)}
        is_test = ~labelled & ids.isin(order.keys())
        test = metadata[is_test].sort_values(lb.ID_COLUMN, key=lambda s: s.map(order))
        n_labelled = int((labelled & ids.isin(order.keys())).sum())
        if n_labelled:
            log.warning("%d images of the sample submission have label rows: they are used for training", n_labelled)

    known = set(ids)
    rest = metadata[~labelled & ~is_test]
    unmatched = [pd.DataFrame({lb.ID_COLUMN: rest[lb.ID_COLUMN], "reason": NO_LABEL, "detail": rest["source_path"]})]
    orphans = [x for x in labels.values() if x.image_id not in known]
    unmatched.append(
        pd.DataFrame(
            {
                lb.ID_COLUMN: [x.image_id for x in orphans],
                "reason": NO_IMAGE,
                "detail": [f"{x.source.name} line {x.first_line}" for x in orphans],
            }
        )
    )
    if submission is not None:
        absent = [image_id for image_id in submission if image_id not in known]
        unmatched.append(
            pd.DataFrame({lb.ID_COLUMN: absent, "reason": SUBMISSION_NO_IMAGE, "detail": "the sample submission"})
        )
    unmatched_table = pd.concat(unmatched, ignore_index=True)
    for reason, count in unmatched_table["reason"].value_counts().items():
        log.warning("%d unmatched: %s (listed in unmatched.csv)", count, reason)
    log.info("%d training images, %d test images", len(train), len(test))
    return Split(
        train=train.reset_index(drop=True),
        test=test[[lb.ID_COLUMN, "rows", "cols"]].reset_index(drop=True),
        unmatched=unmatched_table,
    )


def _in_test_folder(source_path: str, roots: tuple[Path, ...]) -> bool:
    """Whether a folder on ``source_path`` below the input folder has "test" in its name.

    Args:
        source_path: a DICOM's path as stage 01 recorded it.
        roots: ``paths.input_dir`` as configured and resolved. Only folders below it count, so that a "test"
            elsewhere in an absolute path (a temporary folder named after a test, say) does not make every
            image a test image.
    """
    path = Path(source_path)
    for root in roots:
        try:
            path = path.relative_to(root)
            break
        except ValueError:
            continue
    return any("test" in part.lower() for part in path.parent.parts)


def label_table(train: pd.DataFrame, labels: dict[str, lb.ImageLabels]) -> pd.DataFrame:
    """ImageId, has_mask, n_instances, mask_area, rows, cols of every training image.

    Every label row is decoded here, so a malformed one stops the stage before any mask is written.
    """
    records = []
    for image_id, rows, cols in tqdm(
        train[[lb.ID_COLUMN, "rows", "cols"]].itertuples(index=False),
        total=len(train),
        desc="labels",
        unit="image",
        leave=False,
    ):
        image = labels[image_id]
        area = int(image.mask(int(rows), int(cols)).sum()) if image.has_mask else 0
        records.append((image_id, area > 0, image.n_instances, area, int(rows), int(cols)))
    return pd.DataFrame(records, columns=[lb.ID_COLUMN, "has_mask", "n_instances", "mask_area", "rows", "cols"])


def write_masks(
    cfg: DictConfig, table: pd.DataFrame, labels: dict[str, lb.ImageLabels], sizes: list[int], force: bool, key: str
) -> tuple[int, int]:
    """Write ``masks_<size>/<ImageId>.png`` for every image of ``table`` (see :func:`label_table`).

    Args:
        cfg: the resolved config (where the masks go; ``prepare.n_jobs`` joblib workers, -1: every core; small
            batches are written in this process).
        table: the training images.
        labels: their label rows.
        sizes: square sizes to write.
        force: remove every existing mask first; they are also removed when they were made of other labels.
        key: identifies the labels the masks are made of; stored so that a later run can tell whether the
            masks on disk are still valid.

    Returns:
        ``(written, kept)``: images whose masks were written, and images whose masks were already there.
    """
    folders = {size: layout.masks_dir(cfg, size) for size in sizes}
    if force or _read_key(layout.labels_dir(cfg)) != key:
        for old in layout.mask_dirs(cfg).values():
            shutil.rmtree(old)
    write_text(layout.labels_dir(cfg) / MASKS_KEY_FILE, key + "\n")
    finished = set.intersection(*(_png_stems(path) for path in folders.values()))
    todo = [
        (labels[image_id], int(rows), int(cols))
        for image_id, rows, cols in table[[lb.ID_COLUMN, "rows", "cols"]].itertuples(index=False)
        if image_id not in finished
    ]
    chunks = [todo[start : start + CHUNK] for start in range(0, len(todo), CHUNK)]
    workers = int(cfg.prepare.n_jobs) if len(chunks) > 1 else 1
    with tqdm(total=len(todo), desc="masks", unit="image") as progress:
        tasks = (delayed(_write_image_masks)(chunk, folders) for chunk in chunks)
        for done in Parallel(n_jobs=workers, return_as="generator_unordered")(tasks):
            progress.update(done)
    kept = len(table) - len(todo)
    log.info("masks: %d images written, %d already there, sizes %s", len(todo), kept, sizes)
    return len(todo), kept


def _write_image_masks(items: list[tuple[lb.ImageLabels, int, int]], folders: dict[int, Path]) -> int:
    for image, rows, cols in items:
        mask = image.mask(rows, cols)
        for size, path in folders.items():
            write_png(path / f"{image.image_id}.png", resize_mask(mask, size))
    return len(items)


def _png_stems(path: Path) -> set[str]:
    # Hidden names are the temporary files of an interrupted write.
    if not path.is_dir():
        return set()
    return {name[:-4] for name in os.listdir(path) if name.endswith(".png") and not name.startswith(".")}


def _read_key(folder: Path) -> str | None:
    try:
        return (folder / MASKS_KEY_FILE).read_text().strip()
    except OSError:
        return None


def make_folds(cfg: DictConfig, table: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """The ``folds.csv`` frame for the training images of ``table`` (see :func:`pneumoseg.data.folds.assign_folds`).

    Raises:
        ConfigError: ``folds.group_by`` names a column that ``metadata.csv`` lacks, or a bad split setting.
    """
    groups = None
    group_by = cfg.folds.group_by
    if group_by is not None:
        if group_by not in metadata.columns:
            stale = (
                " (it was written by an older stage 01: rerun stage 01 with --force)"
                if group_by in METADATA_KEYS
                else ""
            )
            raise ConfigError(
                f"folds.group_by={group_by!r} is not a column of stage 01's metadata.csv{stale}; "
                f"choose one of {', '.join(metadata.columns)} or null"
            )
        groups = table[lb.ID_COLUMN].map(metadata.set_index(lb.ID_COLUMN)[group_by])
    return fold_split.assign_folds(
        table[lb.ID_COLUMN],
        table["mask_area"],
        int(cfg.folds.n_splits),
        int(cfg.folds.seed),
        cfg.folds.area_bins,
        groups,
    )


def stage(cfg: DictConfig, args: argparse.Namespace) -> dict:
    """The script's entry: :func:`run` with the command line's ``--force``, then the class balance of the folds."""
    summary = run(cfg, force=args.force)
    print(format_balance(summary))
    return summary
