"""What the classifier gate costs the demo: configs/demo_gate.yaml against configs/demo.yaml, measured in one run.

    python benchmarks/bench_gate.py [--images 64] [--repeats 3] [--n 240] [--jobs 2]

1. Training: one epoch of ``--images`` in-memory 128 px images through the demo's Trainer, with the gate head and
   its loss (demo_gate.yaml) and without (demo.yaml), alternating, best of ``--repeats`` after a warm-up each.
2. Search: stage 04's search on ``--n`` synthetic OOF maps of 128 px scored at 1024 px (bench_search's data) with
   the demo's grids, without gate thresholds and with demo_gate.yaml's (gate probabilities drawn higher on
   positive images), ``--jobs`` workers.

Prints both times and their ratios (gated / plain). Timings on a busy machine are noisy: read the ratios.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench_search import generate, grid_blocks, open_images  # noqa: E402
from pneumoseg.config import load_config  # noqa: E402
from pneumoseg.data import rle  # noqa: E402
from pneumoseg.postprocess.search import GRIDS, run_search  # noqa: E402
from pneumoseg.training.distributed import DistContext  # noqa: E402
from pneumoseg.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"plain": ROOT / "configs" / "demo.yaml", "gated": ROOT / "configs" / "demo_gate.yaml"}


def train_seconds(n_images: int, repeats: int) -> dict[str, float]:
    """Best epoch time of each config's Trainer over the same in-memory batches, the two measured alternately."""
    cfgs = {name: load_config(path) for name, path in CONFIGS.items()}
    size, batch = int(cfgs["plain"].data.image_size), int(cfgs["plain"].train.batch_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n_images, 1, size, size, generator=generator)
    masks = (torch.rand(n_images, 1, size, size, generator=generator) > 0.9).float()
    batches = [(images[i : i + batch], masks[i : i + batch]) for i in range(0, n_images, batch)]
    trainers = {name: Trainer.from_config(cfg, DistContext(), len(batches), seed=0) for name, cfg in cfgs.items()}
    for trainer in trainers.values():
        trainer.train_epoch(batches)  # warm-up
    best = {name: np.inf for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            started = time.perf_counter()
            trainer.train_epoch(batches)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def search_seconds(n: int, jobs: int, folder: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Search time and candidate count without and with demo_gate.yaml's gate thresholds."""
    cfg = load_config(CONFIGS["gated"])
    size = int(cfg.train.oof_size)
    generate(folder, n, size, seed=0)
    images = open_images(folder)
    truth = pd.read_csv(folder / "train-rle.csv", dtype=str)  # in the store's order
    rng = np.random.default_rng(1)
    positive = (truth["EncodedPixels"].str.strip() != rle.EMPTY).to_numpy()
    gates = np.clip(rng.normal(0.3 + 0.4 * positive, 0.2), 0, 1).astype(np.float32)
    groups = np.arange(n) % int(cfg.folds.n_splits)
    grids = [GRIDS.build(block) for block in grid_blocks(cfg)]
    seconds, candidates = {}, {}
    for name, thresholds in (("plain", None), ("gated", list(cfg.search.gate_thresholds))):
        started = time.perf_counter()
        result = run_search(
            images,
            groups,
            grids,
            int(cfg.search.refine_steps),
            jobs,
            int(cfg.search.chunk_size),
            gates=gates,
            gate_thresholds=thresholds,
        )
        seconds[name], candidates[name] = time.perf_counter() - started, len(result.candidates)
    return seconds, candidates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="training images per epoch (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per config (default %(default)s)")
    parser.add_argument("--n", type=int, default=240, help="OOF maps searched (default %(default)s, the demo's)")
    parser.add_argument("--jobs", type=int, default=2, help="search worker processes (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    train = train_seconds(args.images, args.repeats)
    print(
        f"training epoch of {args.images} images at 128 px: plain {train['plain']:.2f} s, gated "
        f"{train['gated']:.2f} s: ratio {train['gated'] / train['plain']:.3f}"
    )
    with tempfile.TemporaryDirectory() as folder:
        search, candidates = search_seconds(args.n, args.jobs, Path(folder))
    print(
        f"search of {args.n} OOF maps: plain {search['plain']:.1f} s ({candidates['plain']} candidates), gated "
        f"{search['gated']:.1f} s ({candidates['gated']} candidates): ratio {search['gated'] / search['plain']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
