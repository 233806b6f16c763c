"""Stage 00: write the built-in demo dataset, a synthetic stand-in for the challenge's files.

The images come from :mod:`pneumoseg.demo.phantom`; this stage gives them the challenge's file form in
``paths.input_dir``, so every later stage runs on them exactly as on the real data:

* ``layout: stage1``: ``dicom-images-train/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` and ``dicom-images-test/...``,
  with ``train-rle.csv`` (header ``ImageId, EncodedPixels``, every value after a space, ``-1`` for no
  pneumothorax, one row per instance, the rows of one image not always adjacent).
* ``layout: stage2``: ``stage_2_images/ID_<9 hex>.dcm`` (train and test together), ``stage_2_train.csv``
  (``ImageId,EncodedPixels``, no spaces) and ``stage_2_sample_submission.csv`` (the test images, all ``-1``).

About ``demo.follow_up_rate`` of the patients have two or three images (follow-ups, with the same PatientID, sex
and age give or take a year, and their own study and series UIDs), so patient-grouped folds have work to do.

Either way the test set's labels go to ``test_labels.csv`` in the train labels' format; the pipeline reads it
only to score the final submission. ``demo_annotations.csv`` (ImageId, drain) says which images show a chest drain
(:mod:`pneumoseg.demo.phantom`), for the detector report's subgroups (``report.extra_metadata``).

The result depends on the ``demo`` config section alone and every image on ``(seed, split, index)`` alone, so
parallel runs give the same bytes. ``demo_manifest.json`` lists every file the demo wrote: a changed config
deletes exactly those first, and the stage refuses to overwrite a file it did not write (real data put in the
same folder, say). A run killed midway, rerun with the same config, keeps the DICOMs it already wrote and
recomputes only their labels, which come from the cheap geometry step of the phantom. Every file is written
atomically, the label tables last.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from omegaconf import DictConfig
from tqdm import tqdm

from pneumoseg import stage_table
from pneumoseg.data.dicom import DicomTags, write_jpeg_dicom
from pneumoseg.data.rle import EMPTY, encode
from pneumoseg.demo import phantom
from pneumoseg.demo.layouts import LAYOUTS, SPLITS, DemoImage, Layout, demo_images, patient_id
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import write_json, write_text
from pneumoseg.stages.record import StageRecord

log = logging.getLogger(__name__)

STAGE_NAME = stage_table.stage("00").name
MANIFEST = "demo_manifest.json"
ANNOTATIONS = "demo_annotations.csv"
MIN_IMAGE_SIZE = 64
MAX_AGE = 95


def _check(demo: DictConfig) -> None:
    problems = []
    for key in ("n_train", "n_test", "positive_rate", "follow_up_rate", "image_size", "seed", "layout", "n_jobs"):
        if demo.get(key) is None:
            problems.append(f"demo.{key} is missing")
    if problems:
        raise ConfigError("; ".join(problems) + " (see configs/demo.yaml for every key)")
    if int(demo.n_train) < 1 or int(demo.n_test) < 0:
        problems.append(f"demo.n_train must be >= 1 and demo.n_test >= 0 (got {demo.n_train}, {demo.n_test})")
    for key in ("positive_rate", "follow_up_rate"):
        if not 0 <= float(demo[key]) <= 1:
            problems.append(f"demo.{key} must lie in [0, 1] (got {demo[key]})")
    if int(demo.image_size) < MIN_IMAGE_SIZE:
        problems.append(f"demo.image_size must be >= {MIN_IMAGE_SIZE} (got {demo.image_size}; the challenge's is 1024)")
    if problems:
        raise ConfigError("; ".join(problems))
    LAYOUTS.get(str(demo.layout))


def _make_image(image: DemoImage, plan: phantom.CasePlan, seed: int, size: int, target: Path | None) -> list[str]:
    """Synthesise one image, write its DICOM to ``target`` (None: it exists already), return its RLEs."""
    split = SPLITS.index(image.split)
    geometry, pixels = phantom.case_streams(seed, split, image.index)
    same_as = None
    if image.visit:
        first = phantom.sample_patient(phantom.case_streams(seed, split, image.patient)[0])
        same_as = replace(first, age=min(first.age + image.visit, MAX_AGE))  # a follow-up a year or two on
    case = phantom.make_phantom(geometry, size, plan, same_as)
    if target is not None:
        patient = case.patient
        tags = DicomTags(
            sop_instance_uid=image.sop_uid,
            study_instance_uid=image.study_uid,
            series_instance_uid=image.series_uid,
            patient_id=patient_id(seed, image),
            sex=patient.sex,
            age=str(patient.age),
            view_position=patient.view_position,
            pixel_spacing=patient.pixel_spacing,
        )
        write_jpeg_dicom(target, phantom.render(case, pixels), tags)
    return [encode(instance) for instance in case.instances] or [EMPTY]


def _label_rows(
    image_ids: Sequence[str],
    rles: Sequence[list[str]],
    rng: np.random.Generator,
) -> list[tuple[str, str]]:
    """One row per instance, in image order, except that the later rows of every second multi-instance image
    move a few rows down, as in the real file where the rows of one image are not always adjacent."""
    rows, keys = [], []
    multi = 0
    for position, (image, image_rles) in enumerate(zip(image_ids, rles)):
        for k, rle in enumerate(image_rles):
            rows.append((image, rle))
            keys.append(position + (rng.uniform(1.5, 4.5) if k and multi % 2 == 0 else 0.0))
        multi += len(image_rles) > 1
    return [rows[i] for i in np.argsort(keys, kind="stable")]


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {"fingerprint": None, "files": []}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path} is not valid JSON: delete the demo's files in {folder} and rerun") from None


def _remove(folder: Path, relative: Sequence[str]) -> None:
    """Delete the listed files and then every folder of theirs that became empty (never ``folder`` itself)."""
    parents: set[Path] = set()
    for name in relative:
        path = folder / name
        path.unlink(missing_ok=True)
        parents.update(p for p in path.parents if folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Write the demo dataset into ``paths.input_dir``; a config without a ``demo`` section does nothing.

    Args:
        cfg: the resolved config; reads ``paths.input_dir`` and the ``demo`` section: n_train, n_test,
            positive_rate, follow_up_rate, image_size, seed, layout (stage1 | stage2), n_jobs.
        force: rewrite every file even when the folder is complete for this config.

    Returns:
        A summary: counts of images, patients, positive images and instances per split, DICOMs written and reused
        (the stored one when the folder is already complete for this config).

    Raises:
        ConfigError: a bad ``demo`` section.
        DataError: the folder holds a file the demo would overwrite that it did not write itself (real data,
            say).
    """
    demo = cfg.get("demo")
    if demo is None:
        log.info("%s: the config has no 'demo' section (real data); nothing to do", STAGE_NAME)
        return {"skipped": "no demo section"}
    _check(demo)
    folder = Path(cfg.paths.input_dir)
    record = StageRecord(STAGE_NAME, folder, cfg, ("demo",))
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()

    layout = LAYOUTS.get(str(demo.layout))()
    images = demo_images(demo, layout)
    targets = [image.path for image in images]
    files = [*targets, *layout.table_names(), ANNOTATIONS]
    same = _claim_folder(folder, record.key, files, force)
    record.start()
    write_json(folder / MANIFEST, {"fingerprint": record.key, "files": files})

    streams = {name: phantom.split_stream(int(demo.seed), split) for split, name in enumerate(SPLITS)}
    reuse = [same and (folder / path).is_file() for path in targets]
    plans = {
        name: phantom.plan_cases(int(demo[f"n_{name}"]), float(demo.positive_rate), streams[name]) for name in SPLITS
    }
    rles = _make_images(
        demo, images, plans, [None if reused else folder / path for path, reused in zip(targets, reuse)]
    )
    write_text(
        folder / ANNOTATIONS,
        "ImageId,drain\n"
        + "".join(f"{image.image_id},{int(plans[image.split][image.index].drain)}\n" for image in images),
    )
    summary: dict = {"layout": str(demo.layout), "written": len(images) - sum(reuse), "reused": sum(reuse)}
    summary.update(_write_tables(folder, layout, images, rles, streams))
    record.finish(summary)
    return summary


def _claim_folder(folder: Path, key: str, files: Sequence[str], force: bool) -> bool:
    """Make sure the demo may write ``files`` into ``folder``, and delete a previous, different demo's files.

    Args:
        folder: ``paths.input_dir``.
        key: the stage's fingerprint of this demo config.
        files: the files (relative to ``folder``) this demo writes.
        force: rewrite everything, even the files of this same demo.

    Returns:
        True when ``folder`` holds this same demo, so that its finished images can be kept.

    Raises:
        DataError: ``folder`` holds one of ``files`` that the demo did not write.
    """
    manifest = _read_manifest(folder)
    owned = set(manifest["files"])
    foreign = [name for name in files if name not in owned and (folder / name).exists()]
    if foreign:
        raise DataError(
            f"{folder} already holds {foreign[0]} (and {len(foreign) - 1} more files) that the demo "
            f"did not write; it never overwrites them. Point paths.input_dir at another folder."
        )
    same = manifest["fingerprint"] == key and not force
    if owned and not same:
        why = "--force: writing the demo again" if manifest["fingerprint"] == key else "the demo config changed"
        log.info("%s: %s; deleting the %d files of the previous demo", STAGE_NAME, why, len(owned))
        _remove(folder, sorted(owned))
    return same


def _make_images(
    demo: DictConfig,
    images: Sequence[DemoImage],
    plans: dict[str, list[phantom.CasePlan]],
    paths: Sequence[Path | None],
) -> list[list[str]]:
    """Draw every image of ``images`` (writing its DICOM to its entry of ``paths``; None: keep the file there)
    in ``demo.n_jobs`` processes; return each image's instance run-length strings, in order.

    Args:
        demo: the config's ``demo`` section.
        images: from :func:`demo_images`.
        plans: each split's case plans (:func:`pneumoseg.demo.phantom.plan_cases`, drawn from the split's stream).
        paths: where each image's DICOM goes, None for one already written.
    """
    seed, size = int(demo.seed), int(demo.image_size)
    jobs = (
        delayed(_make_image)(image, plans[image.split][image.index], seed, size, path)
        for image, path in zip(images, paths)
    )
    results = Parallel(n_jobs=int(demo.n_jobs), return_as="generator")(jobs)
    return list(tqdm(results, total=len(images), desc="demo images", unit="img"))


def _write_tables(
    folder: Path,
    layout: Layout,
    images: Sequence[DemoImage],
    rles: Sequence[list[str]],
    streams: dict[str, np.random.Generator],
) -> dict:
    """Write the layout's label tables into ``folder``; return each split's counts (images, positive, instances).

    Args:
        folder: ``paths.input_dir``.
        layout: the :mod:`pneumoseg.demo.layouts` layout that writes the tables.
        images: from :func:`demo_images`.
        rles: from :func:`_make_images`, in the order of ``images``.
        streams: each split's random stream, after the case plans were drawn from it (it orders the rows).
    """
    summary, rows, ids = {}, {}, {}
    for name in SPLITS:
        chosen = [k for k, image in enumerate(images) if image.split == name]
        ids[name] = [images[k].image_id for k in chosen]
        split_rles = [rles[k] for k in chosen]
        rows[name] = _label_rows(ids[name], split_rles, streams[name])
        summary[name] = {
            "images": len(chosen),
            "patients": len({images[k].patient for k in chosen}),
            "positive": sum(r != [EMPTY] for r in split_rles),
            "instances": sum(len(r) for r in split_rles if r != [EMPTY]),
        }
    for table, text in layout.tables(rows["train"], rows["test"], ids["test"]).items():
        write_text(folder / table, text)
    return summary


def stage(cfg: DictConfig, args: argparse.Namespace) -> dict:
    """The script's entry: :func:`run` with the command line's ``--force``."""
    return run(cfg, force=args.force)
