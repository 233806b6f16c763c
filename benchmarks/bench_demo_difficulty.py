"""How hard the demo dataset is for a segmenter that learns nothing: the best tuned pixel-intensity rule
against predicting every image empty, on the demo's own training images.

    python benchmarks/bench_demo_difficulty.py [--config configs/demo.yaml] [--images N] [--resolution 128]

The images are the training split that stage 00 writes for the config (same seed, plans and pixels, made in
memory), downscaled with INTER_AREA to ``--resolution`` (default: data.image_size, the size models train at),
masks likewise (area > 0.5). The rule (see :func:`pneumoseg.demo.phantom.intensity_rule_search`): smooth the image
(Gaussian sigma 0, 1, 2 or 4 px), keep the pixels darker or brighter than one global threshold (every 4th
level), drop components smaller than a minimum area (0 and powers of two); tuned on the labels, scored with the
challenge metric. It is tried on the images as they are and after a per-image contrast stretch (1st to 99th
percentile onto 0..255), which undoes the demo's exposure jitter.

Target (from the issue): the best rule scores at most 0.02 above the all-empty baseline. Prints the baseline,
each variant's best rule, score and margin, and PASS/FAIL; exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np
from joblib import Parallel, delayed

from pneumoseg.config import load_config
from pneumoseg.demo import phantom

TARGET_MARGIN = 0.02


def _train_image(seed: int, index: int, plan: phantom.CasePlan, size: int, resolution: int):
    geometry, pixels = phantom.case_streams(seed, 0, index)
    case = phantom.make_phantom(geometry, size, plan)
    image = cv2.resize(phantom.render(case, pixels), (resolution, resolution), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(case.mask.astype(np.float32), (resolution, resolution), interpolation=cv2.INTER_AREA) > 0.5
    return image, mask


def _stretch(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1, 99])
    return np.clip((image.astype(np.float32) - low) * 255 / max(high - low, 1), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--images", type=int, default=None, help="training images to use (default: demo.n_train)")
    parser.add_argument("--resolution", type=int, default=None, help="evaluation size (default: data.image_size)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    demo = cfg.demo
    n = args.images or int(demo.n_train)
    resolution = args.resolution or int(cfg.data.image_size)
    seed, size = int(demo.seed), int(demo.image_size)

    plans = phantom.plan_cases(int(demo.n_train), float(demo.positive_rate), phantom.split_stream(seed, 0))[:n]
    start = time.perf_counter()
    pairs = Parallel(n_jobs=int(demo.n_jobs))(
        delayed(_train_image)(seed, i, plan, size, resolution) for i, plan in enumerate(plans)
    )
    made = time.perf_counter() - start
    images = np.stack([image for image, _ in pairs])
    masks = np.stack([mask for _, mask in pairs])
    positives = int(masks.reshape(n, -1).any(1).sum())
    print(
        f"{n} training images of {args.config} ({positives} positive), {size} px made in {made:.1f} s, "
        f"scored at {resolution} px"
    )

    worst = -1.0
    for name, variant in (("as written", images), ("contrast-stretched", np.stack([_stretch(i) for i in images]))):
        start = time.perf_counter()
        result = phantom.intensity_rule_search(variant, masks)
        worst = max(worst, result.margin)
        rule = (
            f"sigma {result.sigma:g}, pixel {'<' if result.polarity == 'dark' else '>'} {result.threshold:g}, "
            f"min_area {result.min_area}"
            if np.isfinite(result.threshold)
            else "predict nothing"
        )
        print(
            f"  {name:>18}: baseline {result.baseline:.4f}  best rule {result.score:.4f}  "
            f"margin {result.margin:+.4f}  ({rule}; searched in {time.perf_counter() - start:.1f} s)"
        )
    passed = worst <= TARGET_MARGIN
    print(f"largest margin {worst:+.4f} (target <= {TARGET_MARGIN}): {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
