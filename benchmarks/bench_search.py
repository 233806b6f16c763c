"""Benchmark of stage 04's threshold search: the histogram-based exact search against the straightforward method
(binarise and score every image for each candidate), in the same run.

    python benchmarks/bench_search.py                 # 12,000 OOF images of 256 px, the default grids
    python benchmarks/bench_search.py --n 2000        # a quicker run

Synthetic but realistic OOF probabilities (smooth low background, lesions found at varied confidence, some missed,
some spurious blobs on empty images; 22% positive images with areas from 200 to 40,000 pixels of the 1024 px
image) are written once, in a separate process, to a probability store in a temporary folder (--data keeps them
for reuse); the truth masks go beside it as bits.

1. The fast search runs on every image with the grids of --config (by default configs/base.yaml: 19 thresholds,
   and 20 top x 20 min_area x 20 bottom for the triplet, then component areas around the best points), reading the
   store in chunks. Its time and the process's peak resident memory are reported.
2. The straightforward method scores, on the first --ref-n images, every candidate that the fast search evaluates
   on those images with every --ref-stride-th grid value. Both must give the same scores (to 1e-9), hence the same
   best score; the reference's cost per image and candidate gives its extrapolated time for the full run, and the
   ratio to the fast search.

Exit status 1 when the two methods disagree. Timings on a busy machine are noisy: read the ratios.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pneumoseg.config import load_config, to_dict
from pneumoseg.errors import DataError
from pneumoseg.evaluation.metrics import dice_from_counts
from pneumoseg.postprocess.strategies import build_postprocessor
from pneumoseg.data.probstore import ProbabilityStore, ProbabilityWriter
from pneumoseg.postprocess.search import GRIDS, build_histograms, evaluate, run_search

ROOT = Path(__file__).resolve().parents[1]
TRUTH_FILE = "truth_bits.npy"
TOLERANCE = 1e-9


def synthetic_case(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image's truth mask (bool) and OOF probabilities (float32), ``size`` px."""
    truth = np.zeros((size, size), np.uint8)
    if positive:
        for _ in range(rng.integers(1, 4)):
            area = np.exp(rng.uniform(np.log(200), np.log(40000))) * (size / 1024) ** 2
            ratio = rng.uniform(1, 4)
            axes = (max(1, int(np.sqrt(area * ratio / np.pi))), max(1, int(np.sqrt(area / ratio / np.pi))))
            centre = (int(rng.uniform(0.15, 0.85) * size), int(rng.uniform(0.1, 0.7) * size))
            cv2.ellipse(truth, centre, axes, rng.uniform(0, 180), 0, 360, 1, -1)
    # A smooth background field: coarse noise upsampled, so false positives come in blobs, not speckle.
    logits = -6.0 + 1.5 * cv2.resize(rng.standard_normal((8, 8)).astype(np.float32), (size, size),
                                     interpolation=cv2.INTER_CUBIC)
    if positive and rng.random() > 0.15:
        sigma = rng.uniform(1, 4) * size / 256
        logits += rng.uniform(4, 10) * cv2.GaussianBlur(truth.astype(np.float32), (0, 0), sigma)
    elif not positive and rng.random() < 0.15:
        blob = np.zeros((size, size), np.float32)
        radius = int(rng.uniform(2, 20) * size / 256)
        cv2.circle(blob, (int(rng.uniform(0.2, 0.8) * size), int(rng.uniform(0.2, 0.8) * size)), radius, 1, -1)
        logits += rng.uniform(2, 9) * cv2.GaussianBlur(blob, (0, 0), 2 * size / 256)
    logits += 0.3 * rng.standard_normal((size, size)).astype(np.float32)
    return truth.astype(bool), 1 / (1 + np.exp(-logits))


def generate(folder: Path, n: int, size: int, seed: int, chunk: int = 256) -> None:
    """Write the probability store and the truth bits of ``n`` synthetic images into ``folder``."""
    rng = np.random.default_rng(seed)
    ids = [f"bench.{k:06d}" for k in range(n)]
    truth_bits = np.lib.format.open_memmap(folder / TRUTH_FILE, mode="w+", dtype=np.uint8,
                                           shape=(n, size, (size + 7) // 8))
    with ProbabilityWriter(folder / "oof", ids, size) as writer:
        for start in range(0, n, chunk):
            cases = [synthetic_case(rng, size, rng.random() < 0.22) for _ in range(min(chunk, n - start))]
            writer.write(start, np.stack([probs for _, probs in cases]))
            truth_bits[start:start + len(cases)] = np.packbits(np.stack([t for t, _ in cases]), axis=-1)
    truth_bits.flush()


class Oof:
    """The benchmark's OOF images: the store, and the truth unpacked chunk by chunk."""

    def __init__(self, folder: Path, limit: int | None = None, chunk_size: int = 256) -> None:
        self.store = ProbabilityStore(folder / "oof")
        self.truth_bits = np.load(folder / TRUTH_FILE, mmap_mode="r")
        self.n = len(self.store) if limit is None else min(limit, len(self.store))
        self.chunk_size = chunk_size

    def chunks(self):
        for start in range(0, self.n, self.chunk_size):
            stop = min(start + self.chunk_size, self.n)
            truth = np.unpackbits(self.truth_bits[start:stop], axis=-1, count=self.store.size).astype(bool)
            yield np.asarray(self.store.maps[start:stop]), truth


def grid_blocks(cfg, stride: int = 1) -> list[dict]:
    """The config's search grids as ``{name, params}`` blocks, keeping every ``stride``-th value of each list."""
    return [{"name": name, "params": {key: values[::stride] for key, values in params.items()}}
            for name, params in to_dict(cfg.search.grids).items() if params is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12000, help="OOF images (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="side of the OOF maps (default %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="folds, for the per-fold sums (default %(default)s)")
    parser.add_argument("--ref-n", type=int, default=150, help="images scored by the reference (default %(default)s)")
    parser.add_argument("--ref-stride", type=int, default=2,
                        help="the reference's grid keeps every k-th value of each list (default %(default)s)")
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
            # A separate process, so that generating does not count in this process's peak memory.
            worker = multiprocessing.get_context("spawn").Process(
                target=generate, args=(folder, args.n, args.size, args.seed))
            worker.start()
            worker.join()
            if worker.exitcode:
                raise SystemExit(f"generating the synthetic data failed (exit code {worker.exitcode})")
            print(f"generated {args.n} synthetic OOF images of {args.size} px in "
                  f"{time.perf_counter() - started:.1f} s -> {folder}")
        return run_benchmark(folder, args, cfg)


def _has_data(folder: Path, n: int, size: int) -> bool:
    try:
        store = ProbabilityStore(folder / "oof")
    except DataError:
        return False
    return len(store) == n and store.size == size and (folder / TRUTH_FILE).is_file()


def run_benchmark(folder: Path, args, cfg) -> int:
    refine_steps = int(cfg.search.refine_steps)
    oof = Oof(folder, chunk_size=int(cfg.search.chunk_size))
    groups = np.arange(oof.n) % args.folds
    grids = [GRIDS.build(block) for block in grid_blocks(cfg)]

    started = time.perf_counter()
    hist = build_histograms(oof.chunks())
    hist_seconds = time.perf_counter() - started
    result = run_search(oof.chunks, groups, grids, refine_steps, hist=hist)
    fast_seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # ru_maxrss is in KiB on Linux
    n_candidates = len(result.candidates)

    small = Oof(folder, limit=args.ref_n, chunk_size=int(cfg.search.chunk_size))
    small_grids = [GRIDS.build(block) for block in grid_blocks(cfg, args.ref_stride)]
    started = time.perf_counter()
    fast_small = run_search(small.chunks, groups[:small.n], small_grids, refine_steps)
    fast_small_seconds = time.perf_counter() - started
    blocks = [fast_small.block(row) for row in range(len(fast_small.candidates))]
    started = time.perf_counter()
    pred, inter, true = evaluate(small.chunks(), [build_postprocessor(block) for block in blocks])
    reference_seconds = time.perf_counter() - started
    reference = dice_from_counts(inter, pred, true[:, None]).mean(0)
    fast_scores = fast_small.candidates["dice"].to_numpy()
    difference = float(np.abs(reference - fast_scores).max())
    best_difference = abs(float(reference.max()) - float(fast_scores[fast_small.best]))
    per_pair = reference_seconds / (small.n * len(blocks))
    extrapolated = per_pair * oof.n * n_candidates

    best = result.candidates.iloc[result.best]
    print(f"\nfast search: {oof.n} images of {oof.store.size} px, {n_candidates} candidates "
          f"({', '.join(f'{k}: {v}' for k, v in result.candidates['strategy'].value_counts(sort=False).items())})")
    print(f"  time {fast_seconds:.1f} s (histogram pass {hist_seconds:.1f} s, grids and components "
          f"{fast_seconds - hist_seconds:.1f} s), peak resident memory {peak_gb:.2f} GB")
    print(f"  best: {best['strategy']} {best['params']} dice {best['dice']:.6f}")
    print(f"reference (straightforward) on {small.n} images x {len(blocks)} candidates (grid values 1 in "
          f"{args.ref_stride}): {reference_seconds:.1f} s, {per_pair * 1e6:.1f} us per image and candidate;"
          f" fast search on the same: {fast_small_seconds:.2f} s ({reference_seconds / fast_small_seconds:.0f}x)")
    print(f"  max |score difference| over the candidates {difference:.2e}; best scores differ by {best_difference:.2e}")
    print(f"full run, reference extrapolated: {extrapolated:.0f} s = {extrapolated / fast_seconds:.0f}x the fast "
          f"search's {fast_seconds:.1f} s")
    print(f"targets: same best score to {TOLERANCE:g}: {'yes' if best_difference <= TOLERANCE else 'NO'}; "
          f"under 60 s: {'yes' if fast_seconds < 60 else 'no'} ({fast_seconds:.1f} s); "
          f"under 4 GB: {'yes' if peak_gb < 4 else 'no'} ({peak_gb:.2f} GB)")
    return 0 if difference <= TOLERANCE and best_difference <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
