"""Benchmark of stage 04's threshold search at real scale: every candidate scored at the original 1024 px against
the 1024 px truth, by the counting search of :mod:`pneumoseg.postprocess.search`, against the straightforward method
(bring each map to 1024 px, apply each candidate, score) measured on a subset in the same run.

    python benchmarks/bench_search.py                 # 12,000 OOF maps of 256 px, the default grids, 2 workers
    python benchmarks/bench_search.py --n 2000        # a quicker run

Synthetic but realistic data (smooth low background, lesions found at varied confidence, some missed, spurious
blobs on some empty images; 22% positive images with areas from 200 to 40,000 pixels of the 1024 px image) are
written once, in a separate process: a probability store of --size px maps and a train-rle.csv with the truth at
1024 px, in a temporary folder (--data keeps them for reuse). The search reads them as stage 04 does
(:class:`pneumoseg.postprocess.images.OofImages`).

1. The search runs on every image with the grids of --config (by default configs/base.yaml), with --jobs worker
   processes. Reported: its time and the peak resident memory of this process and its workers together
   (sampled from /proc every 0.2 s).
2. The straightforward method scores, on the first --ref-n images, every candidate that the search evaluates
   there with every --ref-stride-th grid value; the search on the same images and grids must give the same scores
   (to 1e-9). Its cost per image and candidate gives its extrapolated time for the full run, and the ratio.

Exit status 1 when the two methods disagree. Timings on a busy machine are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pneumoseg.config import load_config, to_dict
from pneumoseg.data import rle
from pneumoseg.data.labels import read_labels
from pneumoseg.data.probstore import ProbabilityStore, ProbabilityWriter
from pneumoseg.data.resize import resize_mask
from pneumoseg.errors import DataError
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.io import write_csv
from pneumoseg.postprocess.images import OofImages
from pneumoseg.postprocess.search import GRIDS, evaluate, run_search
from pneumoseg.postprocess.strategies import build_postprocessor

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = 1024
LABELS_FILE = "train-rle.csv"
TOLERANCE = 1e-9
TARGET_SECONDS, TARGET_GB = 300, 4.0


def synthetic_case(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image's truth mask (bool, 1024 px) and OOF probabilities (float32, ``size`` px)."""
    truth = np.zeros((ORIGINAL, ORIGINAL), np.uint8)
    if positive:
        for _ in range(rng.integers(1, 4)):
            area = np.exp(rng.uniform(np.log(200), np.log(40000)))
            ratio = rng.uniform(1, 4)
            axes = (max(1, int(np.sqrt(area * ratio / np.pi))), max(1, int(np.sqrt(area / ratio / np.pi))))
            centre = (int(rng.uniform(0.15, 0.85) * ORIGINAL), int(rng.uniform(0.1, 0.7) * ORIGINAL))
            cv2.ellipse(truth, centre, axes, rng.uniform(0, 180), 0, 360, 1, -1)
    small = resize_mask(truth, size).astype(np.float32) / 255
    # A smooth background field: coarse noise upsampled, so false positives come in blobs, not speckle.
    logits = -6.0 + 1.5 * cv2.resize(
        rng.standard_normal((8, 8)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    if positive and rng.random() > 0.15:
        sigma = rng.uniform(1, 4) * size / 256
        logits += rng.uniform(4, 10) * cv2.GaussianBlur(small, (0, 0), sigma)
    elif not positive and rng.random() < 0.15:
        blob = np.zeros((size, size), np.float32)
        radius = int(rng.uniform(2, 20) * size / 256)
        cv2.circle(blob, (int(rng.uniform(0.2, 0.8) * size), int(rng.uniform(0.2, 0.8) * size)), radius, 1, -1)
        logits += rng.uniform(2, 9) * cv2.GaussianBlur(blob, (0, 0), 2 * size / 256)
    logits += 0.3 * rng.standard_normal((size, size)).astype(np.float32)
    return truth.astype(bool), 1 / (1 + np.exp(-logits))


def generate(folder: Path, n: int, size: int, seed: int, chunk: int = 256) -> None:
    """Write the probability store and the label file of ``n`` synthetic images into ``folder``."""
    rng = np.random.default_rng(seed)
    ids = [f"bench.{k:06d}" for k in range(n)]
    encoded = []
    with ProbabilityWriter(folder / "oof", ids, size) as writer:
        for start in range(0, n, chunk):
            cases = [synthetic_case(rng, size, rng.random() < 0.22) for _ in range(min(chunk, n - start))]
            writer.write(start, np.stack([probs for _, probs in cases]))
            encoded += [rle.encode(truth) for truth, _ in cases]
    write_csv(folder / LABELS_FILE, pd.DataFrame({"ImageId": ids, "EncodedPixels": encoded}))


def open_images(folder: Path, limit: int | None = None) -> OofImages:
    """The benchmark's images as stage 04 reads them (the first ``limit`` only, when given)."""
    store = ProbabilityStore(folder / "oof")
    labels = read_labels(folder / LABELS_FILE)
    n = len(store) if limit is None else min(limit, len(store))
    return OofImages([(store.folder, 0, n)], [labels[i] for i in store.ids[:n]], [(ORIGINAL, ORIGINAL)] * n)


def grid_blocks(cfg, stride: int = 1) -> list[dict]:
    """The config's search grids as ``{name, params}`` blocks, keeping every ``stride``-th value of each list."""
    return [
        {"name": name, "params": {key: values[::stride] for key, values in params.items()}}
        for name, params in to_dict(cfg.search.grids).items()
        if params is not None
    ]


class PeakMemory:
    """Samples the resident memory of this process and all its descendants (Linux /proc), keeping the peak."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return self.peak / 2**30

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, sum(_rss(pid) for pid in _family(os.getpid())))


def _family(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                queue += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return pids


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12000, help="OOF images (default %(default)s)")
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        help="side of the OOF maps (default %(default)s: train.oof_size of siim_unet_r34_512.yaml)",
    )
    parser.add_argument("--folds", type=int, default=5, help="folds, for the nested estimate (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default %(default)s)")
    parser.add_argument("--ref-n", type=int, default=30, help="images scored by the reference (default %(default)s)")
    parser.add_argument(
        "--ref-stride",
        type=int,
        default=3,
        help="the reference's grid keeps every k-th value of each list (default %(default)s)",
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "base.yaml"), help="config with search.grids")
    parser.add_argument("--data", help="folder for the synthetic data, kept and reused (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        folder = Path(args.data or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not _has_data(folder, args.n, args.size):
            started = time.perf_counter()
            # A separate process, so that generating does not count in this process's memory.
            worker = multiprocessing.get_context("spawn").Process(
                target=generate, args=(folder, args.n, args.size, args.seed)
            )
            worker.start()
            worker.join()
            if worker.exitcode:
                raise SystemExit(f"generating the synthetic data failed (exit code {worker.exitcode})")
            print(
                f"generated {args.n} synthetic OOF images of {args.size} px in "
                f"{time.perf_counter() - started:.1f} s -> {folder}"
            )
        return run_benchmark(folder, args, cfg)


def _has_data(folder: Path, n: int, size: int) -> bool:
    try:
        store = ProbabilityStore(folder / "oof")
    except DataError:
        return False
    return len(store) == n and store.size == size and (folder / LABELS_FILE).is_file()


def run_benchmark(folder: Path, args, cfg) -> int:
    refine_steps, block = int(cfg.search.refine_steps), int(cfg.search.chunk_size)
    images = open_images(folder)
    groups = np.arange(len(images)) % args.folds
    grids = [GRIDS.build(block_) for block_ in grid_blocks(cfg)]
    with PeakMemory() as memory:
        started = time.perf_counter()
        result = run_search(images, groups, grids, refine_steps, args.jobs, block)
        fast_seconds = time.perf_counter() - started

    small = open_images(folder, args.ref_n)
    small_grids = [GRIDS.build(block_) for block_ in grid_blocks(cfg, args.ref_stride)]
    started = time.perf_counter()
    fast_small = run_search(small, groups[: len(small)], small_grids, refine_steps)
    fast_small_seconds = time.perf_counter() - started
    blocks = [fast_small.block(row) for row in range(len(fast_small.candidates))]
    started = time.perf_counter()
    pred, inter, true = evaluate(small, [build_postprocessor(b) for b in blocks])
    reference_seconds = time.perf_counter() - started
    reference = dice_from_counts(inter, pred, true[:, None]).mean(0)
    fast_scores = fast_small.candidates["dice"].to_numpy()
    difference = float(np.abs(reference - fast_scores).max())
    per_pair = reference_seconds / (len(small) * len(blocks))
    n_candidates = len(result.candidates)
    extrapolated = per_pair * len(images) * n_candidates

    best = result.candidates.iloc[result.best]
    print(
        f"\nsearch: {len(images)} OOF maps of {args.size} px scored at {ORIGINAL} px, {n_candidates} candidates "
        f"({', '.join(f'{k}: {v}' for k, v in result.candidates['strategy'].value_counts(sort=False).items())})"
        f", nested over {args.folds} folds, {args.jobs} workers"
    )
    print(f"  time {fast_seconds:.1f} s, peak resident memory (this process and its workers) {memory.gb:.2f} GB")
    print(
        f"  best: {best['strategy']} {best['params']} dice {best['dice']:.6f}; nested estimate "
        f"{result.nested.score:.6f}"
    )
    print(
        f"reference (straightforward, 1 process) on {len(small)} images x {len(blocks)} candidates (grid values "
        f"1 in {args.ref_stride}): {reference_seconds:.1f} s, {per_pair * 1e3:.2f} ms per image and candidate; "
        f"the search (1 process) on the same: {fast_small_seconds:.2f} s "
        f"({reference_seconds / fast_small_seconds:.0f}x faster)"
    )
    print(f"  max |score difference| over the candidates {difference:.2e}")
    print(
        f"full run, reference extrapolated to 1 process: {extrapolated:.0f} s = {extrapolated / fast_seconds:.0f}x "
        f"the search's {fast_seconds:.1f} s"
    )
    print(
        f"targets: same scores to {TOLERANCE:g}: {'yes' if difference <= TOLERANCE else 'NO'}; "
        f"under {TARGET_SECONDS} s: {'yes' if fast_seconds < TARGET_SECONDS else 'NO'} ({fast_seconds:.1f} s); "
        f"under {TARGET_GB:g} GB: {'yes' if memory.gb < TARGET_GB else 'NO'} ({memory.gb:.2f} GB)"
    )
    return 0 if difference <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
