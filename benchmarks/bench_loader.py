"""Benchmark of the training data loader at 512 px: augmented reads against plain reads, per transform, per worker.

    python benchmarks/bench_loader.py [--config configs/base.yaml] [--images 240] [--prepared DIR] [key=value ...]

Reads ``--images`` 512 px PNGs and masks through the training dataset (:class:`pneumoseg.data.dataset.
SegmentationDataset`: PNG decode, augmentation, normalisation, mask to float): synthetic smooth-noise images
written to a temporary folder, or the first ones of a prepared folder (``--prepared output/prepared/demo``, the
PNGs of stage 01 and masks of stage 02 at ``train.image_size``). All in one run:

* per transform, on one core in this process: the extra CPU milliseconds per image of each block of the config's
  ``augment`` section alone when it is applied (probability 1; each member of a ``OneOf`` alone), and its
  expected cost at its configured probability;
* the floor (the same reads, no augmentation) and the config's whole pipeline, in this process and through the
  training DataLoader with 1 and 2 worker processes (images per second per worker).

Target: the augmented reads within 1.4x of the floor's time per image (one core). Prints every figure, then one
line with the ratio and PASS/FAIL; exits 1 when the target fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench_train_step import write_images  # noqa: E402
from pneumoseg.config import load_config, to_dict  # noqa: E402
from pneumoseg.data.augment import WITH_MEMBERS, build_augment  # noqa: E402
from pneumoseg.data.dataset import PreparedData, make_loader  # noqa: E402
from pneumoseg.modeling.normalize import normalize_from_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATIO_TARGET = 1.4
SIZE = 512
ORIGINALS = {"CoarseElasticTransform": "ElasticTransform"}  # our cheaper transforms -> the library's originals


def ms_per_image(dataset, repeats: int) -> float:
    """Best of ``repeats`` passes over ``dataset`` in this process, in CPU ms per item (seeded as the samplers
    do). CPU time, not wall time: on a shared machine other jobs' load inflates wall time, not this figure."""
    best = float("inf")
    for repeat in range(repeats):
        start = time.process_time()
        for index in range(len(dataset)):
            dataset[index, repeat * len(dataset) + index]
        best = min(best, time.process_time() - start)
    return 1000 * best / len(dataset)


def loader_rate(dataset, workers: int, batch: int = 8) -> float:
    """Images per second per worker process through the training DataLoader, after one warm-up pass (wall time:
    the workers' CPU time is not this process's; on a loaded machine this figure is low)."""
    items = [(i, i) for i in range(len(dataset))]
    loader = make_loader(dataset, batch, workers, torch.device("cpu"), sampler=items)
    for _ in loader:  # starts the (persistent) workers
        pass
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(dataset) / (time.perf_counter() - start) / workers


def always(block: dict) -> dict:
    """``block`` at probability 1."""
    return {"name": block["name"], "params": {**(block.get("params") or {}), "p": 1.0}}


def probability(block: dict) -> float:
    """A block's probability, albumentations' default where it gives none."""
    return float((block.get("params") or {}).get("p", 1.0 if block["name"] in WITH_MEMBERS else 0.5))


def members(blocks: list[dict]) -> list[tuple[dict, float]]:
    """Each block, and each member of a ``OneOf`` alone, with the probability it has in ``blocks`` (a member of
    a ``OneOf`` of probability p among n members: p / n)."""
    found = []
    for block in blocks:
        if block["name"] == "OneOf":
            share = probability(block) / len(block["params"]["transforms"])
            found += [(member, share) for member in block["params"]["transforms"]]
        else:
            found.append((block, probability(block)))
    return found


def single_blocks(blocks: list[dict]) -> list[tuple[str, dict, float]]:
    """Rows ``(label, block, probability)`` of the cost table: every transform of the section alone at
    probability 1 with the probability it has in the section; each member of a ``FusedGeometric`` alone inside
    one, beside the same member unfused; and our cheaper transforms' library originals beside them."""

    def with_original(label: str, block: dict, p: float) -> list[tuple[str, dict, float]]:
        row = [(label, always(block), p)]
        if block["name"] in ORIGINALS:  # our cheaper version: its library original beside it, for the saving
            row.append(
                (f"  ({ORIGINALS[block['name']]}, original)", {**always(block), "name": ORIGINALS[block["name"]]}, p)
            )
        return row

    rows = []
    for block, p in members(blocks):
        if block["name"] != "FusedGeometric":
            rows += with_original(block["name"], block, p)
            continue
        for member, share in members(block["params"]["transforms"]):
            fused = {"name": "FusedGeometric", "params": {**block["params"], "transforms": [always(member)]}}
            rows.append((f"FusedGeometric[{member['name']}]", fused, p * share))
            rows += with_original(f"  ({member['name']}, unfused)", member, p * share)
        rows.append(("FusedGeometric (whole block)", always(block), p))
    return rows


def transform_costs(data, rows, normalize, blocks: list[dict], floor_ms: float, repeats: int) -> None:
    """Print each transform's extra ms per image over the floor, applied and at its configured probability."""
    print(f"{'transform':40s} {'applied ms':>10s} {'p':>6s} {'expected ms':>11s}")
    for label, block, p in single_blocks(blocks):
        pipeline = build_augment({"transforms": [block]})
        extra = ms_per_image(data.dataset(rows, normalize, pipeline), repeats) - floor_ms
        print(f"{label:40s} {extra:10.2f} {p:6.3f} {p * extra:11.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "base.yaml"))
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--prepared", default=None, help="a prepared folder with 512 px PNGs and masks")
    parser.add_argument("--repeats", type=int, default=3, help="passes per in-process figure; the best counts")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.image_size={SIZE}", *args.overrides])
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one core: the figures are per core, as a DataLoader worker runs
    blocks = OmegaConf.to_container(cfg.augment, resolve=True)["transforms"]
    normalize = normalize_from_model(to_dict(cfg.model))
    with tempfile.TemporaryDirectory() as tmp:
        if args.prepared is None:
            write_images(Path(tmp), args.images, SIZE)
        data = PreparedData.load(args.prepared or tmp, SIZE)
        rows = data.folds.head(args.images)
        plain = data.dataset(rows, normalize)
        augmented = data.dataset(rows, normalize, build_augment(cfg.augment))
        floor_ms = ms_per_image(plain, args.repeats)
        transform_costs(data, rows, normalize, copy.deepcopy(blocks), floor_ms, args.repeats)
        augmented_ms = ms_per_image(augmented, args.repeats)
        rates = {
            (name, w): loader_rate(ds, w) for name, ds in (("floor", plain), ("augmented", augmented)) for w in (1, 2)
        }
    ratio = augmented_ms / floor_ms
    print(f"{len(rows)} images at {SIZE} px, {args.config}; one core in process (CPU time):")
    print(f"  floor (read, no augmentation): {floor_ms:6.2f} ms/image  {1000 / floor_ms:6.1f} images/s")
    print(f"  augmented (the whole section): {augmented_ms:6.2f} ms/image  {1000 / augmented_ms:6.1f} images/s")
    for (name, workers), rate in rates.items():
        print(f"  DataLoader, {name:9s}, {workers} worker(s): {rate:6.1f} images/s per worker")
    print(
        f"SUMMARY augmented / floor {ratio:.2f}x (target <= {RATIO_TARGET}); {1000 / augmented_ms:.0f} augmented "
        f"images/s per core: {'PASS' if ratio <= RATIO_TARGET else 'FAIL'}"
    )
    return 0 if ratio <= RATIO_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
