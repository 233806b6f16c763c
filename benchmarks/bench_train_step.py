"""Benchmark of the training step: the real DataLoader with augmentations against tensors already in memory.

    python benchmarks/bench_train_step.py [--config configs/demo.yaml] [--images 160] [--repeats 3] [key=value ...]
    python benchmarks/bench_train_step.py --device cuda [--images 512] [train.num_workers=12 ...]

Both measurements train the same model (built from the config, random weights) with the same
:class:`pneumoseg.training.trainer.Trainer` in the same run; they differ only in where the batches come from:

* loader: the stage's training DataLoader (:func:`pneumoseg.training.trainer.train_loader`: PNG reading, the config's
  augmentation pipeline and sampler, collation, worker processes), over ``--images`` synthetic PNGs written to a
  temporary folder at the training size;
* memory: one epoch of those batches collected beforehand, stepped through from host memory.

Each figure is the best of ``--repeats`` epochs after one warm-up epoch (which starts the persistent workers and,
on a GPU, lets cuDNN choose its kernels). Target (CPU): loader time per image at most 1.15 x the memory time.

``--device cuda`` defaults to ``configs/siim_unet_r34_512.yaml`` (UNet-ResNet34 at 512 px, AMP, channels_last;
ImageNet weights are not needed for timing, so none are downloaded) and reports images per second and the peak
GPU memory as well.
Prints every figure and PASS/FAIL; exits 1 when the CPU target fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pneumoseg import layout  # noqa: E402
from pneumoseg.config import load_config  # noqa: E402
from pneumoseg.data.dataset import PreparedData  # noqa: E402
from pneumoseg.io import write_csv, write_png  # noqa: E402
from pneumoseg.modeling.device import resolve_device  # noqa: E402
from pneumoseg.training.distributed import DistContext  # noqa: E402
from pneumoseg.training.trainer import Trainer, train_loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATIO_TARGET = 1.15
DEFAULT_CONFIGS = {"cpu": ROOT / "configs" / "demo.yaml", "cuda": ROOT / "configs" / "siim_unet_r34_512.yaml"}


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` grey PNGs (smooth noise) with masks (a disc on every third image) and a one-fold folds.csv."""
    rng = np.random.default_rng(seed)
    ids = [f"bench.{i}" for i in range(count)]
    for i, image_id in enumerate(ids):
        noise = cv2.resize(
            rng.integers(0, 255, (size // 16, size // 16), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC
        )
        mask = np.zeros((size, size), np.uint8)
        if i % 3 == 0:
            cv2.circle(mask, tuple(int(c) for c in rng.integers(size // 4, 3 * size // 4, 2)), size // 8, 255, -1)
        write_png(layout.images_dir(folder, size) / f"{image_id}.png", noise)
        write_png(layout.masks_dir(folder, size) / f"{image_id}.png", mask)
    write_csv(
        layout.folds_path(folder),
        pd.DataFrame({"ImageId": ids, "fold": 0, "has_mask": [i % 3 == 0 for i in range(count)]}),
    )


def epoch_seconds(trainer: Trainer, batches) -> float:
    """Wall time of one training epoch over ``batches`` (train_epoch ends by reading the loss: a device sync)."""
    start = time.perf_counter()
    trainer.train_epoch(batches)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: demo on cpu, siim 512 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=None, help="images per epoch (default 160 cpu, 512 cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per source; the best counts")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    config = args.config or DEFAULT_CONFIGS[args.device]
    images = args.images or (512 if args.device == "cuda" else 160)
    cfg = load_config(config, ["model.params.encoder_weights=null", f"train.device={args.device}", *args.overrides])
    size, batch = int(cfg.train.image_size), int(cfg.train.batch_size)
    ctx = DistContext(device=resolve_device(args.device))
    torch.backends.cudnn.benchmark = True  # as training does unless train.deterministic

    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), images, size)
        data = PreparedData.load(tmp, size)
        loader = train_loader(cfg, data, data.folds, ctx, seed=0)
        memory = list(loader)  # one epoch of real, augmented batches, kept in host memory
        updates = -(-len(loader) // int(cfg.train.accumulation_steps))
        trainer = Trainer.from_config(cfg, ctx, updates_per_epoch=updates, seed=0)
        trainer.train_epoch(loader)  # warm-up: workers, allocator, kernels
        trainer.train_epoch(memory)
        # Interleave the two sources so that drifting machine load hits both alike.
        loader_s, memory_s = [], []
        for repeat in range(args.repeats):
            loader.sampler.set_epoch(repeat + 1)
            loader_s.append(epoch_seconds(trainer, loader))
            memory_s.append(epoch_seconds(trainer, memory))

    per_image = {"loader": min(loader_s) / images, "memory": min(memory_s) / images}
    ratio = per_image["loader"] / per_image["memory"]
    name = f"{cfg.model.name}-{cfg.model.params.encoder_name}"
    print(
        f"config {config}: {name} at {size} px, batch {batch}, accumulation {cfg.train.accumulation_steps}, "
        f"{cfg.train.num_workers} workers, {images} images/epoch, device {ctx.device}"
        + (
            f", amp {cfg.train.amp}, channels_last {cfg.train.channels_last}"
            if args.device == "cuda"
            else f", {torch.get_num_threads()} torch threads"
        )
    )
    for source, seconds in per_image.items():
        print(f"  {source:6s}: {1000 * seconds:8.2f} ms/image  {1 / seconds:8.1f} images/s")
    print(f"  ratio loader / memory: {ratio:.3f} (target <= {RATIO_TARGET})")
    if ctx.device.type == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f} GiB")
    passed = ratio <= RATIO_TARGET
    print("PASS" if passed else "FAIL", "(the target is for the CPU)" if args.device == "cuda" else "")
    return 0 if passed or args.device == "cuda" else 1


if __name__ == "__main__":
    sys.exit(main())
