"""Check of a finished experiment's figures by a second, straightforward code path (issue 11):

(a) stage 04's chosen post-processing, recomputed: each OOF map brought to its image's original size with OpenCV's
    bilinear resize (as stage 05 brings a test map back), the rule of ``thresholds.json`` applied with
    ``cv2.connectedComponentsWithStats``, and scored against the truth decoded here from the label file, must give
    the reported OOF score to within 0.002;
(b) the nested (held-out-fold) estimate against stage 05's held-out test score, recomputed here from
    ``submission.csv`` and ``test_labels.csv``: they must agree within 0.03. To tell noise from bias it prints the
    standard error of the test score (the per-image Dice's standard deviation / sqrt(n)), the nested per-fold
    scores' spread, and the OOF and test scores' difference in standard errors.

    python benchmarks/check_search_fidelity.py                       # the demo (configs/demo.yaml)
    python benchmarks/check_search_fidelity.py --config CONFIG [key=value ...]

Nothing here comes from :mod:`pneumoseg.postprocess` or the RLE codec: the run-length decoding, the rule and the
metric are written out again, so that an error shared by the search, stage 05 and the server would show.
Exit status 1 when a check fails, 2 when an input is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pneumoseg import layout
from pneumoseg.config import load_config
from pneumoseg.data.inputs import locate_train_labels

SEARCH_TOLERANCE = 0.002
NESTED_TOLERANCE = 0.03
REFERENCE_SIDE = 1024  # areas in thresholds.json are pixels of a 1024 x 1024 image
TEST_LABELS = "test_labels.csv"
SCORE_FILE = "test_score.json"


def rle_masks(csv_path: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The challenge's ``rle2mask``, per image: the union of its rows' masks (relative run-length form, pixels
    counted down the columns). Images absent from ``shapes`` are skipped."""
    table = pd.read_csv(csv_path, skipinitialspace=True, dtype=str)
    table.columns = [c.strip() for c in table.columns]
    masks = {}
    for image_id, encoded in zip(table["ImageId"], table["EncodedPixels"].fillna("-1")):
        if image_id not in shapes:
            continue
        rows, cols = shapes[image_id]
        flat = masks.setdefault(image_id, np.zeros(rows * cols, bool))
        numbers = [int(x) for x in encoded.split()]
        if numbers == [-1]:
            continue
        position = 0
        for start, length in zip(numbers[0::2], numbers[1::2]):
            position += start
            flat[position : position + length] = True
            position += length
    return {image_id: flat.reshape(shapes[image_id][::-1]).T for image_id, flat in masks.items()}


def drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_pixels`` pixels."""
    if min_pixels <= 0:
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def apply_rule(probs: np.ndarray, block: dict) -> np.ndarray:
    """The ``threshold`` or ``triplet`` rule of a ``thresholds.json`` block on a float32 map at original size."""
    scale = probs.shape[0] * probs.shape[1] / REFERENCE_SIDE**2
    params = block["params"]
    if block["name"] == "threshold":
        return drop_small(probs > np.float32(params["threshold"]), params["min_area"] * scale)
    if block["name"] == "triplet":
        if (probs > np.float32(params["top"])).sum() < params["min_area"] * scale:
            return np.zeros(probs.shape, bool)
        return drop_small(probs > np.float32(params["bottom"]), params["min_component_area"] * scale)
    raise SystemExit(f"unknown strategy {block['name']!r} in thresholds.json: this check knows threshold, triplet")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """The challenge's Dice of one image: 1 when both masks are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def to_original(levels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A stored OOF map (uint8, p = level / 255) at ``rows`` x ``cols``: bilinear where it grows, area where it
    shrinks, as stage 05 brings a test map back."""
    probs = levels.astype(np.float32) / 255
    grow = rows >= probs.shape[0] and cols >= probs.shape[1]
    return cv2.resize(probs, (cols, rows), interpolation=cv2.INTER_LINEAR if grow else cv2.INTER_AREA)


def recompute_oof(cfg, block: dict) -> pd.DataFrame:
    """Every OOF image's Dice under ``block`` at its original size, with its fold."""
    folds = pd.read_csv(layout.train_folds_path(cfg), dtype={"ImageId": str})
    sizes = pd.read_csv(layout.labels_path(cfg), dtype={"ImageId": str})
    shapes = {i: (int(r), int(c)) for i, r, c in zip(sizes["ImageId"], sizes["rows"], sizes["cols"])}
    truth = rle_masks(locate_train_labels(cfg.data.train_labels, cfg.paths.input_dir), shapes)
    rows = []
    for fold in sorted(folds["fold"].unique()):
        store = layout.oof_dir(layout.checkpoints_dir(layout.fold_dir(cfg, int(fold)), str(cfg.predict.checkpoints)))
        maps = np.load(store / "probs.npy", mmap_mode="r")
        ids = pd.read_csv(store / "ids.csv", dtype=str)["ImageId"]
        for image_id, levels in zip(ids, maps):
            pred = apply_rule(to_original(np.asarray(levels), *shapes[image_id]), block)
            rows.append({"ImageId": image_id, "fold": int(fold), "dice": dice(pred, truth[image_id])})
    return pd.DataFrame(rows)


def recompute_test(cfg) -> tuple[np.ndarray, float]:
    """Every held-out test image's Dice of ``submission.csv`` against ``test_labels.csv``, and the all-empty
    baseline's score there."""
    listing = pd.read_csv(layout.test_images_path(cfg), dtype={"ImageId": str})
    shapes = {i: (int(r), int(c)) for i, r, c in zip(listing["ImageId"], listing["rows"], listing["cols"])}
    truth = rle_masks(Path(cfg.paths.input_dir) / TEST_LABELS, shapes)
    predicted = rle_masks(layout.submission_path(cfg), shapes)
    scores = np.array([dice(predicted[i], truth[i]) for i in shapes])
    return scores, float(np.mean([not truth[i].any() for i in shapes]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="the experiment's config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as given to the stages")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    needed = [
        layout.thresholds_path(cfg),
        layout.oof_report_path(cfg),
        layout.submission_path(cfg),
        Path(cfg.paths.input_dir) / TEST_LABELS,
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        print(f"missing {missing}: run stages 00-05 first (bash run_all.sh {args.config})", file=sys.stderr)
        return 2
    block = json.loads(layout.thresholds_path(cfg).read_text())
    report = json.loads(layout.oof_report_path(cfg).read_text())

    oof = recompute_oof(cfg, block)
    recomputed, reported = float(oof["dice"].mean()), float(block["oof_score"])
    search_ok = abs(recomputed - reported) <= SEARCH_TOLERANCE
    print(
        f"(a) chosen {block['name']} {block['params']}: reported OOF {reported:.4f}, recomputed at the original "
        f"size {recomputed:.4f} (difference {recomputed - reported:+.4f}, tolerance {SEARCH_TOLERANCE}) "
        f"{'ok' if search_ok else 'FAIL'}"
    )

    test, empty_test = recompute_test(cfg)
    stage05 = json.loads((layout.predict_dir(cfg) / SCORE_FILE).read_text())["test_score"]
    nested = float(report["nested_score"])
    fold_nested = np.array([f["nested_score"] for f in report["per_fold"]])
    test_se = float(test.std(ddof=1) / math.sqrt(len(test)))
    oof_se = float(oof["dice"].std(ddof=1) / math.sqrt(len(oof)))
    gap = nested - float(test.mean())
    nested_ok = abs(gap) <= NESTED_TOLERANCE
    print(
        f"(b) nested estimate {nested:.4f} (folds {', '.join(f'{s:.4f}' for s in fold_nested)}; std "
        f"{fold_nested.std(ddof=1):.4f}), held-out test {test.mean():.4f} on {len(test)} images (stage 05: "
        f"{stage05:.4f}; standard error {test_se:.4f}); gap {gap:+.4f} = {gap / test_se:+.2f} test standard "
        f"errors, tolerance {NESTED_TOLERANCE} {'ok' if nested_ok else 'FAIL'}"
    )
    print(
        f"    OOF {recomputed:.4f} +- {oof_se:.4f} over {len(oof)} images; OOF - test "
        f"{recomputed - test.mean():+.4f} = {(recomputed - test.mean()) / math.hypot(oof_se, test_se):+.2f} "
        f"combined standard errors; all-empty: OOF {report['empty_baseline']:.4f}, test {empty_test:.4f}"
    )
    return 0 if search_ok and nested_ok else 1


if __name__ == "__main__":
    sys.exit(main())
