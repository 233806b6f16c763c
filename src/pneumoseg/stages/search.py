"""Stage 04: choose the post-processing that maximises the out-of-fold (OOF) Dice, and report on the OOF predictions.

Inputs: stage 03's ``03_train/folds.csv`` (ImageId, fold) and, for each fold ``k`` of ``train.folds``, the
probability store ``03_train/fold<k>/oof/`` of its validation images (``fold<k>/ema/oof/`` or
``fold<k>/averaged/oof/`` with ``predict.checkpoints: ema`` or ``averaged``: the weights stage 05 then uses) and
``fold<k>/log.csv`` (training curves);
stage 02's truth masks ``02_labels/masks_<train.image_size>/<ImageId>.png`` (resized to the OOF size when they
differ) and ``labels.csv``; stage 01's X-rays ``01_convert/images_<train.image_size>/`` for the report's gallery.

Outputs in ``${paths.experiment_dir}/04_search/``:

* ``thresholds.json``: the chosen strategy as a ``{name, params}`` block, with its scores; what
  :func:`pneumoseg.postprocess.strategies.load_postprocessor` reads;
* ``candidates.csv``: every candidate evaluated, its Dice overall and on each fold;
* ``per_image.csv``: areas and Dice of the chosen strategy on every OOF image;
* ``oof_report.json``, ``oof_report.md`` and ``plots/`` (see :mod:`pneumoseg.reports.oof`).

The search itself is :func:`pneumoseg.postprocess.search.run_search`; the chosen strategy is then applied again, image by
image, through :mod:`pneumoseg.postprocess.strategies`, and its score must agree with the search's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from omegaconf import DictConfig
from tqdm import tqdm

from pneumoseg import layout
from pneumoseg.data.resize import resize
from pneumoseg.config import to_dict
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.io import read_png, write_csv, write_json
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.postprocess.strategies import PostProcessor, build_postprocessor
from pneumoseg.data.probstore import IDS_FILE, PROBS_FILE, ProbabilityStore
from pneumoseg.postprocess.search import GRIDS, Chunk, SearchResult, evaluate, run_search
from pneumoseg.reports import oof as oof_report
from pneumoseg.stages.record import StageRecord

log = logging.getLogger(__name__)

STAGE_NAME = "04_search_thresholds"
SECTIONS = ("data", "search", "postprocess")
# The chosen strategy, re-applied image by image, must reproduce the search's score to this precision.
AGREEMENT = 1e-9


@dataclass
class OofFold:
    """One fold's OOF predictions."""

    fold: int
    store: ProbabilityStore


def open_folds(cfg: DictConfig) -> list[OofFold]:
    """Open and check every fold's OOF store against ``folds.csv`` and ``labels.csv``.

    Raises:
        DataError: ``folds.csv`` or ``labels.csv`` is missing; a fold has no complete or a non-empty store; a
            store's ImageIds differ from that fold's rows of ``folds.csv``, or are missing from ``labels.csv``;
            the stores' map sizes differ.
    """
    folds_csv = layout.train_folds_path(cfg)
    folds = _read_csv(folds_csv, ("ImageId", "fold"), "run scripts/03_train.py first")
    labels_csv = layout.labels_path(cfg)
    labelled = set(_read_csv(labels_csv, ("ImageId",), "run scripts/02_prepare_labels.py first")["ImageId"])
    trained = layout.select_folds(cfg.train.folds, folds["fold"].unique(), "train.folds", folds_csv)
    opened = []
    for fold, rows in folds[folds["fold"].isin(trained)].groupby("fold", sort=True):
        folder = layout.oof_dir(layout.checkpoints_dir(layout.fold_dir(cfg, fold), str(cfg.predict.checkpoints)))
        if not (folder / PROBS_FILE).is_file() or not (folder / IDS_FILE).is_file():
            raise DataError(f"fold {fold} of {folds_csv} has no OOF predictions: {folder} lacks {PROBS_FILE} or "
                            f"{IDS_FILE}. Finish training fold {fold} (scripts/03_train.py), or drop it from folds.csv.")
        store = ProbabilityStore(folder)
        if len(store) == 0:
            raise DataError(f"the OOF store {folder} of fold {fold} holds no images; rerun fold {fold} of "
                            f"scripts/03_train.py --force")
        _check_same_ids(store.ids, rows["ImageId"], f"the OOF store {folder}", f"fold {fold} of {folds_csv}")
        unlabelled = [image_id for image_id in store.ids if image_id not in labelled]
        if unlabelled:
            raise DataError(f"{len(unlabelled)} ImageIds of the OOF store {folder} are not in {labels_csv}, e.g. "
                            f"{unlabelled[:3]}; training and labels come from different data. Rerun stages 02-03.")
        opened.append(OofFold(int(fold), store))
    sizes = {f.store.size for f in opened}
    if len(sizes) != 1:
        raise DataError(f"the OOF stores under {layout.train_dir(cfg)} have different map sizes {sorted(sizes)}; "
                        f"rerun scripts/03_train.py --force so that every fold predicts at one size")
    return opened


def _read_csv(path: Path, columns: tuple[str, ...], fix: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path} not found; {fix}")
    frame = pd.read_csv(path, dtype={"ImageId": str})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; {fix}")
    return frame


def _check_same_ids(found, expected, found_name: str, expected_name: str) -> None:
    found, expected = list(found), set(expected)
    extra = [i for i in found if i not in expected]
    missing = sorted(expected - set(found))
    if extra or missing or len(found) != len(set(found)):
        raise DataError(
            f"{found_name} and {expected_name} disagree on ImageIds: {len(missing)} missing from the store "
            f"(e.g. {missing[:3]}), {len(extra)} not in the fold (e.g. {extra[:3]}), {len(found) - len(set(found))} "
            f"repeated. Rerun that fold of scripts/03_train.py --force."
        )


class OofSet:
    """The OOF predictions of every fold, in fold order, with their truth masks at the OOF size.

    Args:
        folds: the opened stores (:func:`open_folds`).
        masks_dir: folder of the truth masks (``<ImageId>.png``, 0/255, any square size).
        n_jobs: threads reading the masks.
        chunk_size: images per block read.
    """

    def __init__(self, folds: list[OofFold], masks_dir: Path, n_jobs: int, chunk_size: int) -> None:
        self.folds = folds
        self.chunk_size = chunk_size
        self.ids = [image_id for f in folds for image_id in f.store.ids]
        self.fold_of = np.concatenate([np.full(len(f.store), f.fold) for f in folds])
        self.groups = np.concatenate([np.full(len(f.store), k) for k, f in enumerate(folds)])
        self.size = folds[0].store.size
        self._row = {image_id: k for k, image_id in enumerate(self.ids)}
        self._truth = self._read_masks(masks_dir, n_jobs)

    def _read_masks(self, masks_dir: Path, n_jobs: int) -> np.ndarray:
        if not masks_dir.is_dir():
            raise DataError(f"truth masks folder {masks_dir} not found; run scripts/02_prepare_labels.py first")
        # Kept as bits: 12,000 masks of 256 px take 98 MB.
        packed = np.empty((len(self.ids), self.size, (self.size + 7) // 8), np.uint8)
        with Parallel(n_jobs=n_jobs, prefer="threads") as parallel:
            for start in tqdm(range(0, len(self.ids), self.chunk_size), desc="truth masks", unit="chunk"):
                block = self.ids[start:start + self.chunk_size]
                masks = parallel(delayed(_read_mask)(masks_dir / f"{i}.png", self.size) for i in block)
                packed[start:start + len(block)] = np.packbits(np.stack(masks), axis=-1)
        return packed

    def __len__(self) -> int:
        return len(self.ids)

    def truth(self, rows: slice | np.ndarray) -> np.ndarray:
        return np.unpackbits(self._truth[rows], axis=-1, count=self.size).astype(bool)

    def chunks(self, desc: str = "OOF") -> Iterator[Chunk]:
        """One pass over every image: ``(uint8 levels, boolean truth)`` blocks, in fold order."""
        start = 0
        with tqdm(total=len(self), desc=desc, unit="img") as progress:
            for fold in self.folds:
                for ids, levels in fold.store.chunks(self.chunk_size):
                    yield levels, self.truth(slice(start, start + len(ids)))
                    start += len(ids)
                    progress.update(len(ids))

    def case(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 OOF map and the truth mask of one image."""
        row = self._row[image_id]
        offset = 0
        for fold in self.folds:
            if row < offset + len(fold.store):
                return np.asarray(fold.store.maps[row - offset]), self.truth(slice(row, row + 1))[0]
            offset += len(fold.store)
        raise KeyError(image_id)


def _read_mask(path: Path, size: int) -> np.ndarray:
    return resize(read_png(path), size, size, "area") >= 128


def _input_facts(cfg: DictConfig, folds: list[OofFold]) -> dict:
    """What the outputs depend on besides the config: the OOF stores and label files, by size and time."""
    paths = [layout.train_folds_path(cfg), layout.labels_path(cfg)]
    paths += [f.store.folder / name for f in folds for name in (PROBS_FILE, IDS_FILE)]
    return {"folds": [f.fold for f in folds], **{str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}}


def build_grids(cfg: DictConfig) -> list:
    """The search grids of ``search.grids`` (strategy name -> grid parameters; null entries skipped)."""
    grids = [GRIDS.build({"name": name, "params": params})
             for name, params in to_dict(cfg.search.grids).items() if params is not None]
    if not grids:
        raise ConfigError(f"search.grids names no strategy to search; give at least one of {GRIDS.names()}")
    return grids


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Search the post-processing on the OOF predictions and write the report; returns the report's numbers."""
    folder = layout.search_dir(cfg)
    folds = open_folds(cfg)
    record = StageRecord(STAGE_NAME, folder, cfg, SECTIONS, inputs=_input_facts(cfg, folds))
    if record.skip_if_complete(force):
        return record.stored_summary()
    grids = build_grids(cfg)
    default = build_postprocessor(cfg.postprocess)
    record.start()

    oof = OofSet(folds, layout.masks_dir(cfg, cfg.train.image_size), cfg.search.n_jobs,
                 cfg.search.chunk_size)
    log.info("searching %d OOF images of %d px from %d folds", len(oof), oof.size, len(folds))
    started = time.time()
    result = run_search(oof.chunks, oof.groups, grids, cfg.search.refine_steps)
    seconds = time.time() - started
    chosen = build_postprocessor(result.block(result.best))
    per_image = _score_images(oof, result, chosen, default)

    write_csv(folder / "candidates.csv", _candidates_table(result, folds))
    write_csv(folder / "per_image.csv", per_image)
    numbers = oof_report.report_numbers(result, per_image, chosen.to_block(), default.to_block(), oof.size, seconds)
    write_json(layout.thresholds_path(cfg), {**chosen.to_block(), "oof_score": numbers["oof_score"],
                                             "nested_score": numbers["nested_score"], "oof_size": oof.size,
                                             "n_images": len(oof)})
    logs = {f.fold: layout.fold_log_path(layout.fold_dir(cfg, f.fold)) for f in folds}
    xrays = layout.images_dir(cfg, cfg.train.image_size)

    def gallery_case(image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels, truth = oof.case(image_id)
        return read_png(xrays / f"{image_id}.png"), truth, chosen(levels)

    write_json(layout.oof_report_path(cfg), numbers)
    oof_report.write_report(folder, numbers, result, per_image, logs, gallery_case, cfg.search.gallery_cases,
                            cfg.search.thumbnail_size)
    record.finish(numbers)
    return numbers


def _score_images(oof: OofSet, result: SearchResult, chosen: PostProcessor, default: PostProcessor) -> pd.DataFrame:
    """Apply the chosen and the default strategy to every image; check the chosen one against the search."""
    pred, inter, true = evaluate(oof.chunks("check"), [chosen, default])
    dice = dice_from_counts(inter, pred, true[:, None])
    searched = float(result.candidates["dice"].iloc[result.best])
    if abs(dice[:, 0].mean() - searched) > AGREEMENT:
        raise RuntimeError(f"the search scored {chosen.to_block()} {searched:.12f}, applying it gives "
                           f"{dice[:, 0].mean():.12f}; pneumoseg.postprocess.search and pneumoseg.postprocess.strategies disagree")
    return pd.DataFrame({"ImageId": oof.ids, "fold": oof.fold_of, "true_area": true, "pred_area": pred[:, 0],
                         "intersection": inter[:, 0], "dice": dice[:, 0], "default_pred_area": pred[:, 1],
                         "default_dice": dice[:, 1]})


def _candidates_table(result: SearchResult, folds: list[OofFold]) -> pd.DataFrame:
    table = result.candidates.copy()
    for k, f in enumerate(folds):
        table[f"dice_fold{f.fold}"] = result.group_sums[:, k] / result.group_sizes[k]
    return table.sort_values("dice", ascending=False, kind="stable")


def cli(cfg: DictConfig, args) -> None:
    """The script's entry: run the stage and print the summary table."""
    print(oof_report.summary_table(run(cfg, force=args.force)))
