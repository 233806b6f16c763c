"""Benchmark of what judging the model as a detector adds to stage 04: the search with the per-candidate image-level
counts (for ``search.objective`` and the sensitivity trade-off), the image-level scores and the detector figures
with their patient-bootstrap intervals, against stage 04's work before them, measured in the same run.

    python benchmarks/bench_detector.py               # 12,000 OOF maps of 256 px, the default grids, 2 workers
    python benchmarks/bench_detector.py --n 2000      # a quicker run

The synthetic OOF maps and truth are :mod:`bench_search`'s (``--data`` keeps and reuses them). The old path is
stage 04's search module as it was at ``--baseline`` (a git revision, read with ``git show``): its ``run_search``
and ``evaluate`` of the chosen and the default strategy. The new path: today's ``run_search``, ``evaluate`` with the
image-level scores, and :func:`pneumoseg.evaluation.detection.detector_numbers` over the per-image table (patients:
every second image shares one with the next). Both choose the same strategy (checked). Each path runs twice, in
the order old, new, new, old (``--rounds 1``: once each, new first, so that it alone pays for cold caches); printed:
each path's total time and their ratio; the target is at most 1.10. Exit status 1 when the choices differ.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench_search import ROOT, _has_data, generate, grid_blocks, open_images
from pneumoseg.config import load_config
from pneumoseg.evaluation.detection import detector_numbers
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.postprocess.search import GRIDS, evaluate, run_search
from pneumoseg.postprocess.strategies import build_postprocessor

BASELINE = "082228b"  # the last commit before the detector report
TARGET_RATIO = 1.10
SEARCH_MODULE = "src/pneumoseg/postprocess/search.py"


def load_baseline(revision: str, folder: Path):
    """Stage 04's search module as it was at ``revision``, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{SEARCH_MODULE}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    (folder / "baseline_search.py").write_text(source)
    # An importable module (on sys.path, which the worker processes inherit), so its functions pickle by name.
    sys.path.insert(0, str(folder))
    return importlib.import_module("baseline_search")


def old_path(module, images, groups, grids, args, cfg) -> tuple[float, dict]:
    """Seconds of the old stage 04 work, and its choice."""
    default = build_postprocessor(cfg.postprocess)
    started = time.perf_counter()
    result = module.run_search(
        images, groups, grids, int(cfg.search.refine_steps), args.jobs, int(cfg.search.chunk_size)
    )
    chosen = result.block(result.best)
    module.evaluate(images, [build_postprocessor(chosen), default], args.jobs, int(cfg.search.chunk_size))
    return time.perf_counter() - started, chosen


def new_path(images, groups, grids, args, cfg) -> tuple[float, dict, dict]:
    """Seconds of today's stage 04 work with the detector figures, its choice and the figures."""
    default = build_postprocessor(cfg.postprocess)
    started = time.perf_counter()
    result = run_search(images, groups, grids, int(cfg.search.refine_steps), args.jobs, int(cfg.search.chunk_size))
    chosen = result.block(result.best)
    pred, inter, true, scores = evaluate(
        images, [build_postprocessor(chosen), default], args.jobs, int(cfg.search.chunk_size), with_scores=True
    )
    frame = pd.DataFrame(
        {
            "true_area": true,
            "pred_area": pred[:, 0],
            "score": scores[:, 0],
            "dice": dice_from_counts(inter, pred, true[:, None])[:, 0],
            "PatientID": [f"p{k // 2}" for k in range(len(true))],
        }
    )
    numbers = detector_numbers(frame, list(cfg.folds.area_bins), [], int(cfg.report.bootstrap), 0)
    return time.perf_counter() - started, chosen, numbers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12000, help="OOF images (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="side of the OOF maps (default %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="folds, for the nested estimate (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default %(default)s)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old path (default %(default)s)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "base.yaml"), help="config with search.grids")
    parser.add_argument("--data", help="folder for the synthetic data, kept and reused (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, choices=(1, 2), default=2, help="1: new, old; 2: old, new, new, old")
    args = parser.parse_args()
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="bench_detector_") as tmp:
        folder = Path(args.data or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not _has_data(folder, args.n, args.size):
            generate(folder, args.n, args.size, args.seed)
        baseline = load_baseline(args.baseline, Path(tmp))
        images = open_images(folder)
        groups = np.arange(len(images)) % args.folds
        grids = [GRIDS.build(block) for block in grid_blocks(cfg)]
        # Old, new, new, old: the first run of either pays for cold caches and worker start-up alike. With one
        # round, the new path runs first and pays for them alone, so the ratio errs against it.
        old_seconds = 0.0
        if args.rounds == 2:
            old_seconds, _ = old_path(baseline, images, groups, grids, args, cfg)
        new_seconds, new_choice, numbers = new_path(images, groups, grids, args, cfg)
        if args.rounds == 2:
            new_seconds += new_path(images, groups, grids, args, cfg)[0]
        last_old, old_choice = old_path(baseline, images, groups, grids, args, cfg)
        old_seconds += last_old
    ratio = new_seconds / old_seconds
    print(
        f"stage 04 on {len(images)} OOF maps of {args.size} px, {args.jobs} workers, nested over {args.folds} "
        f"folds, each path {'twice' if args.rounds == 2 else 'once'}: old path ({args.baseline}) {old_seconds:.1f} s; "
        f"with the detector figures "
        f"({cfg.report.bootstrap} patient resamples) {new_seconds:.1f} s: ratio {ratio:.3f} "
        f"(target <= {TARGET_RATIO:.2f}: {'yes' if ratio <= TARGET_RATIO else 'NO'})"
    )
    print(
        f"  image-level AUC {numbers['auc']:.4f}, sensitivity "
        f"{numbers['operating_point']['sensitivity']['value']:.4f}, specificity "
        f"{numbers['operating_point']['specificity']['value']:.4f}; same choice: {old_choice == new_choice}"
    )
    return 0 if old_choice == new_choice else 1


if __name__ == "__main__":
    sys.exit(main())
