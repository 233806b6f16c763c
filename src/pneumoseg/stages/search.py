"""Stage 04: choose the post-processing that maximises the out-of-fold (OOF) Dice, and report on the OOF predictions.

Inputs: stage 03's ``03_train/folds.csv`` (ImageId, fold) and, for each fold ``k`` of ``train.folds``, the
probability store ``03_train/fold<k>/oof/`` of its validation images, with their gate probabilities ``gate.npy`` for a
model with the gate head (``fold<k>/ema/oof/`` or
``fold<k>/averaged/oof/`` with ``predict.checkpoints: ema`` or ``averaged``: the weights stage 05 then uses) and
``fold<k>/log.csv`` (training curves);
the training label file (``data.train_labels``: ``train-rle.csv`` or ``stage_2_train.csv``), decoded at each image's
original size (``rows``, ``cols`` of stage 02's ``labels.csv``): the truth every candidate is scored against;
stage 01's X-rays ``01_convert/images_<train.image_size>/`` for the report's gallery.

Outputs in ``${paths.experiment_dir}/04_search/``:

* ``thresholds.json``: the chosen strategy as a ``{name, params}`` block, with its scores; what
  :func:`pneumoseg.postprocess.strategies.load_postprocessor` reads;
* ``candidates.csv``: every candidate evaluated, its Dice overall and on each fold;
* ``per_image.csv``: areas and Dice of the chosen strategy on every OOF image, its image-level ``score`` (the
  probability the strategy decides the image on, :meth:`pneumoseg.postprocess.strategies.PostProcessor.score`)
  and its gate probability;
* ``oof_report.json``, ``oof_report.md`` and ``plots/`` (see :mod:`pneumoseg.reports.oof`), with the detector
  section (:mod:`pneumoseg.reports.detection`): per_image.csv joined with stage 01's ``metadata.csv`` and
  ``report.extra_metadata``, judged image by image.

The search itself is :func:`pneumoseg.postprocess.search.run_search`: every candidate is scored as the submission
is, on each OOF map brought to its image's original size as stage 05 brings a test map back. The chosen strategy
is then applied again, image by image at full size, through :mod:`pneumoseg.postprocess.strategies`, and its score
must agree with the search's.

On an ensemble config (:func:`pneumoseg.config.ensemble_members`) the OOF maps are each member's (of its own
``predict.checkpoints`` set), blended per image at its original size with the members' weights
(:class:`BlendedOofSet`, as stage 05 blends test maps). Every member alone, every pair (with more than two members)
and all members are searched, each with its OOF and nested scores; the one with the best nested score is chosen,
and the outputs above are those of its blend, plus ``ensemble.json`` (:mod:`pneumoseg.stages.ensemble`) and the
table of every candidate in the report.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pneumoseg import layout, stage_table
from pneumoseg.config import is_ensemble, to_dict
from pneumoseg.data.blend import blend_gates
from pneumoseg.data.fold_table import read_trained_folds
from pneumoseg.data.inputs import locate_train_labels
from pneumoseg.data.labels import read_labels
from pneumoseg.data.probstore import GATE_FILE, IDS_FILE, PROBS_FILE, ProbabilityStore
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.evaluation import detection, sanity
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.inference.experiments import trained_members
from pneumoseg.io import read_png, write_csv, write_json
from pneumoseg.postprocess.images import BlendedImages, OofImages
from pneumoseg.postprocess.search import GRIDS, SearchResult, build_objective, evaluate, run_search, to_original
from pneumoseg.postprocess.strategies import PostProcessor, build_postprocessor
from pneumoseg.reports import detection as detection_report
from pneumoseg.reports import oof as oof_report
from pneumoseg.stage_table import command, run_first
from pneumoseg.stages import ensemble
from pneumoseg.stages.record import StageRecord

log = logging.getLogger(__name__)

STAGE_NAME = stage_table.stage("04").name
SECTIONS = ("data", "search", "postprocess", "report")
ENSEMBLE_SECTIONS = (*SECTIONS, "ensemble")
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
    folds = read_trained_folds(cfg)
    labels_csv = layout.labels_path(cfg)
    labelled = set(_read_csv(labels_csv, ("ImageId",), run_first("02"))["ImageId"])
    trained = layout.select_folds(cfg.train.folds, folds["fold"].unique(), "train.folds", folds_csv)
    opened = []
    for fold in trained:
        rows = folds[folds["fold"] == fold]
        folder = layout.oof_dir(layout.checkpoints_dir(layout.fold_dir(cfg, fold), str(cfg.predict.checkpoints)))
        if not (folder / PROBS_FILE).is_file() or not (folder / IDS_FILE).is_file():
            raise DataError(
                f"fold {fold} of {folds_csv} has no OOF predictions: {folder} lacks {PROBS_FILE} or "
                f"{IDS_FILE}. Finish training fold {fold} ({command('03')}), or drop it from folds.csv."
            )
        store = ProbabilityStore(folder)
        if len(store) == 0:
            raise DataError(
                f"the OOF store {folder} of fold {fold} holds no images; rerun fold {fold} of {command('03')} --force"
            )
        _check_same_ids(store.ids, rows["ImageId"], f"the OOF store {folder}", f"fold {fold} of {folds_csv}")
        unlabelled = [image_id for image_id in store.ids if image_id not in labelled]
        if unlabelled:
            raise DataError(
                f"{len(unlabelled)} ImageIds of the OOF store {folder} are not in {labels_csv}, e.g. "
                f"{unlabelled[:3]}; training and labels come from different data. Rerun stages 02-03."
            )
        opened.append(OofFold(int(fold), store))
    sizes = {f.store.size for f in opened}
    if len(sizes) != 1:
        raise DataError(
            f"the OOF stores under {layout.train_dir(cfg)} have different map sizes {sorted(sizes)}; "
            f"rerun {command('03')} --force so that every fold predicts at one size"
        )
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
            f"repeated. Rerun that fold of {command('03')} --force."
        )


class OofSet:
    """The OOF predictions of every fold, in fold order, with their truth at the original size.

    Args:
        folds: the opened stores (:func:`open_folds`).
        label_file: the training label file (``train-rle.csv`` or ``stage_2_train.csv``): the truth.
        labels_csv: stage 02's ``labels.csv``: each image's original ``rows`` and ``cols``.

    Raises:
        DataError: an OOF image without rows in the label file.
    """

    def __init__(self, folds: list[OofFold], label_file: Path, labels_csv: Path) -> None:
        self.ids = [image_id for f in folds for image_id in f.store.ids]
        self.fold_of = np.concatenate([np.full(len(f.store), f.fold) for f in folds])
        self.groups = np.concatenate([np.full(len(f.store), k) for k, f in enumerate(folds)])
        self.size = folds[0].store.size
        self.gates = _gates(folds)
        self._row = {image_id: k for k, image_id in enumerate(self.ids)}
        labels = read_labels(label_file)
        unlabelled = [i for i in self.ids if i not in labels]
        if unlabelled:
            raise DataError(
                f"{len(unlabelled)} OOF images have no rows in the label file {label_file}, e.g. "
                f"{unlabelled[:3]}; stage 02 read another label file. Rerun stages 02-03."
            )
        sizes = _read_csv(labels_csv, ("ImageId", "rows", "cols"), f"rerun {command('02')}")
        shape_of = dict(zip(sizes["ImageId"], zip(sizes["rows"].astype(int), sizes["cols"].astype(int))))
        ranges = [(f.store.folder, 0, len(f.store)) for f in folds]
        self.images: OofImages | BlendedImages = OofImages(
            ranges, [labels[i] for i in self.ids], [shape_of[i] for i in self.ids]
        )

    def __len__(self) -> int:
        return len(self.ids)

    def case(self, image_id: str) -> tuple[np.ndarray, np.ndarray, float | None]:
        """The OOF map (uint8 levels; float32 probabilities of a blend), the original-size truth and the gate
        probability (None without) of one image."""
        row = self._row[image_id]
        [(levels, truth)] = list(self.images.part(row, row + 1))
        return levels, truth, None if self.gates is None else float(self.gates[row])


def _gates(folds: list[OofFold]) -> np.ndarray | None:
    """Every fold's gate probabilities, in fold order; None when no fold has them.

    Raises:
        DataError: some folds have gate probabilities and others not.
    """
    missing = [f.store.folder for f in folds if f.store.gates is None]
    if len(missing) == len(folds):
        return None
    if missing:
        raise DataError(
            f"{missing[0]} has no {GATE_FILE} while other folds' OOF stores have one: the folds were "
            f"trained with and without the gate head; rerun those folds of {command('03')} --force"
        )
    return np.concatenate([f.store.gates for f in folds])


class BlendedOofSet(OofSet):
    """Several members' OOF sets of the same images, blended per image at its original size
    (:class:`pneumoseg.postprocess.images.BlendedImages`).

    Args:
        sets: each member's :class:`OofSet`.
        weights: one per member.
        names: the members' names, for messages.

    Raises:
        DataError: members whose OOF stores list other images, or the same in another order or other folds.
    """

    def __init__(self, sets: Sequence[OofSet], weights: Sequence[float], names: Sequence[str]) -> None:
        first = sets[0]
        for other, name in zip(sets[1:], names[1:]):
            if other.ids != first.ids or not np.array_equal(other.fold_of, first.fold_of):
                raise DataError(
                    f"the OOF stores of ensemble members {names[0]!r} and {name!r} do not list the same "
                    f"images in the same folds and order; retrain {name!r} on the same prepared data "
                    f"({command('03')} --config <its config> --force)"
                )
        self.ids, self.fold_of, self.groups, self._row = first.ids, first.fold_of, first.groups, first._row
        self.size = max(s.size for s in sets)
        # A blend's members are single experiments: their images are OofImages.
        self.images = BlendedImages([cast(OofImages, s.images) for s in sets], list(weights))
        self.gates = blend_gates([s.gates for s in sets], weights)


def _input_facts(cfg: DictConfig, folds: list[OofFold]) -> dict:
    """What the outputs depend on besides the config: the OOF stores and label files, by size and time."""
    paths = [layout.train_folds_path(cfg), layout.labels_path(cfg), train_label_file(cfg)]
    paths += [
        f.store.folder / name
        for f in folds
        for name in (PROBS_FILE, IDS_FILE, GATE_FILE)
        if (f.store.folder / name).is_file()
    ]
    return {"folds": [f.fold for f in folds], **{str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}}


def train_label_file(cfg: DictConfig) -> Path:
    """The training label file the truth is decoded from (``data.train_labels`` in ``paths.input_dir``)."""
    return locate_train_labels(cfg.data.train_labels, cfg.paths.input_dir)


def build_grids(cfg: DictConfig) -> list:
    """The search grids of ``search.grids`` (strategy name -> grid parameters; null entries skipped)."""
    grids = [
        GRIDS.build({"name": name, "params": params})
        for name, params in to_dict(cfg.search.grids).items()
        if params is not None
    ]
    if not grids:
        raise ConfigError(f"search.grids names no strategy to search; give at least one of {GRIDS.names()}")
    return grids


def run(cfg: DictConfig, force: bool = False) -> dict:
    """Search the post-processing on the OOF predictions (an ensemble's: :func:`run_ensemble`) and write the report;
    returns the report's numbers."""
    if is_ensemble(cfg):
        return run_ensemble(cfg, force)
    folder = layout.search_dir(cfg)
    folds = open_folds(cfg)
    record = StageRecord(STAGE_NAME, folder, cfg, SECTIONS, inputs=_input_facts(cfg, folds))
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()
    build_grids(cfg)
    build_objective(cfg.search.get("objective"))
    record.start()
    oof = OofSet(folds, train_label_file(cfg), layout.labels_path(cfg))
    result, seconds = _search(cfg, oof, len(folds))
    numbers = _write_outputs(cfg, oof, result, seconds, cfg)
    record.finish(numbers)
    return numbers


def run_ensemble(cfg: DictConfig, force: bool = False) -> dict:
    """Stage 04 on an ensemble config: search every member, pair and all members on their blended OOF maps, choose
    by the nested score, and write the chosen blend's outputs with ``ensemble.json``; see the module docstring."""
    folder = layout.search_dir(cfg)
    members = trained_members(cfg)
    member_folds = [open_folds(m.cfg) for m in members]
    inputs = {m.name: _input_facts(m.cfg, folds) for m, folds in zip(members, member_folds)}
    record = StageRecord(STAGE_NAME, folder, cfg, ENSEMBLE_SECTIONS, inputs=inputs)
    force = record.redo(force)
    if record.skip_if_complete(force):
        return record.stored_summary()
    build_grids(cfg)
    record.start()
    truth_cfg = members[0].cfg  # trained_members checked that every member has this prepared data and folds
    sets = [OofSet(folds, train_label_file(truth_cfg), layout.labels_path(truth_cfg)) for folds in member_folds]
    candidates, searched = [], []
    for subset in ensemble.combinations(len(members)):
        chosen = [members[i] for i in subset]
        oof = BlendedOofSet([sets[i] for i in subset], [m.weight for m in chosen], [m.name for m in chosen])
        result, seconds = _search(cfg, oof, len(member_folds[0]), label=" + ".join(m.name for m in chosen))
        candidates.append(
            {
                "members": [m.name for m in chosen],
                "weights": [m.weight for m in chosen],
                "oof_score": float(result.candidates["dice"].iloc[result.best]),
                "nested_score": None if result.nested is None else result.nested.score,
                "postprocess": result.block(result.best),
            }
        )
        searched.append((oof, result, seconds, chosen[0].cfg))
    best = ensemble.best_candidate(candidates)
    choice = ensemble.write_choice(cfg, members, candidates, best)
    numbers = _write_outputs(cfg, *searched[best], ensemble=choice)
    summary = {key: value for key, value in numbers.items() if key != "ensemble"}
    record.finish({**summary, "members": choice["chosen"]["members"]})
    return numbers


def _search(cfg: DictConfig, oof: OofSet, n_folds: int, label: str | None = None) -> tuple[SearchResult, float]:
    """Run the search of ``search`` on ``oof``; returns the result and the seconds it took."""
    log.info(
        "searching %d OOF maps of %d px from %d folds%s, scored at the images' original size",
        len(oof),
        oof.size,
        n_folds,
        f" ({label})" if label else "",
    )
    started = time.time()
    result = run_search(
        oof.images,
        oof.groups,
        build_grids(cfg),
        int(cfg.search.refine_steps),
        int(cfg.search.n_jobs),
        int(cfg.search.chunk_size),
        gates=oof.gates,
        gate_thresholds=_gate_thresholds(cfg, oof),
        objective=build_objective(cfg.search.get("objective")),
    )
    return result, time.time() - started


def _write_outputs(
    cfg: DictConfig, oof: OofSet, result: SearchResult, seconds: float, source: DictConfig, ensemble: dict | None = None
) -> dict:
    """Check the search's choice image by image and write every output of the stage; returns the report's numbers.

    Args:
        cfg: the stage's config (its ``search`` and ``postprocess`` sections, its output folder).
        oof: the OOF set searched.
        result, seconds: the search of ``oof``.
        source: the experiment whose training logs and X-rays the report shows (``cfg`` itself, or an ensemble's
            first chosen member).
        ensemble: an ensemble's ``ensemble.json`` content, added to the report.
    """
    folder = layout.search_dir(cfg)
    n_jobs, block = int(cfg.search.n_jobs), int(cfg.search.chunk_size)
    default = build_postprocessor(cfg.postprocess)
    chosen = build_postprocessor(result.block(result.best))
    per_image = _score_images(oof, result, chosen, default, n_jobs, block)
    folds = sorted(set(oof.fold_of.tolist()))
    write_csv(folder / "candidates.csv", _candidates_table(result, folds))
    write_csv(folder / "per_image.csv", per_image)
    numbers = oof_report.report_numbers(result, per_image, chosen.to_block(), default.to_block(), oof.size, seconds)
    per_image = detection_report.with_metadata(per_image, layout.metadata_path(source), extra_metadata(cfg))
    numbers["detection"] = detector_numbers(per_image, cfg, source)
    if ensemble is not None:
        numbers["ensemble"] = ensemble
    numbers[sanity.WARNINGS_KEY] = sanity.log_warnings(STAGE_NAME, sanity.search_warnings(numbers))
    write_json(
        layout.thresholds_path(cfg),
        {
            **chosen.to_block(),
            "oof_score": numbers["oof_score"],
            "nested_score": numbers["nested_score"],
            "oof_size": oof.size,
            "n_images": len(oof),
        },
    )
    logs = {fold: layout.fold_log_path(layout.fold_dir(source, fold)) for fold in folds}
    xrays = layout.images_dir(source, source.train.image_size)

    def gallery_case(image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels, truth, gate = oof.case(image_id)
        return read_png(xrays / f"{image_id}.png"), truth, chosen(to_original(levels, truth.shape), gate)

    write_json(layout.oof_report_path(cfg), numbers)
    oof_report.write_report(
        folder,
        numbers,
        result,
        per_image,
        logs,
        oof_report.Gallery(gallery_case, cfg.search.gallery_cases, cfg.search.thumbnail_size),
    )
    return numbers


def extra_metadata(cfg: DictConfig) -> Path | None:
    """``report.extra_metadata``: a CSV of more per-image columns for the detector's subgroups (None: none)."""
    path = cfg.get("report", {}).get("extra_metadata")
    return None if path is None else Path(str(path))


def detector_numbers(frame: pd.DataFrame, cfg: DictConfig, source: DictConfig) -> dict:
    """The detector figures of one per-image table (:func:`pneumoseg.evaluation.detection.detector_numbers`)
    with the ``report`` section's settings and ``source``'s area bins (``folds.area_bins``)."""
    report = cfg.get("report", {})
    return detection.detector_numbers(
        frame,
        list(source.folds.area_bins),
        list(report.get("subgroups", [])),
        int(report.get("bootstrap", 1000)),
        int(report.get("seed", 0)),
    )


def _gate_thresholds(cfg: DictConfig, oof: OofSet) -> list[float] | None:
    """``search.gate_thresholds``, or None (with a note) when the OOF maps have gate probabilities it does not
    search."""
    thresholds = cfg.search.get("gate_thresholds")
    if thresholds is None and oof.gates is not None:
        log.info(
            "the OOF predictions have gate probabilities, but search.gate_thresholds is null: only ungated "
            "candidates are searched"
        )
    return None if thresholds is None else list(thresholds)


def _score_images(
    oof: OofSet, result: SearchResult, chosen: PostProcessor, default: PostProcessor, n_jobs: int, block_size: int
) -> pd.DataFrame:
    """Apply the chosen and the default strategy to every image at its original size; check the chosen one
    against the search."""
    pred, inter, true, scores = evaluate(
        oof.images, [chosen, default], n_jobs, block_size, gates=oof.gates, with_scores=True
    )
    dice = dice_from_counts(inter, pred, true[:, None])
    searched = float(result.candidates["dice"].iloc[result.best])
    if abs(dice[:, 0].mean() - searched) > AGREEMENT:
        raise RuntimeError(
            f"the search scored {chosen.to_block()} {searched:.12f}, applying it gives "
            f"{dice[:, 0].mean():.12f}; pneumoseg.postprocess.search and "
            f"pneumoseg.postprocess.strategies disagree"
        )
    return pd.DataFrame(
        {
            "ImageId": oof.ids,
            "fold": oof.fold_of,
            "true_area": true,
            "pred_area": pred[:, 0],
            "intersection": inter[:, 0],
            "dice": dice[:, 0],
            "score": scores[:, 0],
            "default_pred_area": pred[:, 1],
            "default_dice": dice[:, 1],
            "gate": np.full(len(oof), np.nan) if oof.gates is None else oof.gates,
        }
    )


def _candidates_table(result: SearchResult, folds: list[int]) -> pd.DataFrame:
    table = result.candidates.copy()
    for k, fold in enumerate(folds):
        table[f"dice_fold{fold}"] = result.group_sums[:, k] / result.group_sizes[k]
    return table.sort_values("dice", ascending=False, kind="stable")


def stage(cfg: DictConfig, args: argparse.Namespace) -> None:
    """The script's entry: run the stage and print the summary table."""
    print(oof_report.summary_table(run(cfg, force=args.force)))
