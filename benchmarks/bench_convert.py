"""Benchmark of stage 01 (DICOM to PNG) against the cost of its unavoidable work, measured in the same run.

    python benchmarks/bench_convert.py [--siim-dir ../shared/siim] [--images 300] [--size 512] [--repeats 2]

Input: ``--images`` copies of the 10 real 1024x1024 JPEG sample DICOMs under distinct stems (the stage-2
flat layout), in a temporary folder. Each measurement is a whole forced stage run (listing, reading,
decoding, resizing, PNG writing, metadata.csv) into a fresh output folder, as a first conversion does
(overwriting just-written files costs ext4 an extra flush per file), the best of ``--repeats``.

Targets (from the issue):

* parallel efficiency: images per second with 2 workers at least 85% of twice the rate with 1 worker.
  Worker start-up is paid once per stage (about a second, amortised over 12,000 real images), so one
  warm-up run starts the workers before the timed runs.
* overhead: the stage's time per image with 1 worker at most 1.5x the floor: Pillow decoding the JPEG
  frame, OpenCV resizing and PNG encoding, in memory, on the same images.

Prints every figure and PASS/FAIL per target; exits 1 when a target fails.
"""

from __future__ import annotations

import os

# One core per process: keep threaded numpy/OpenCV backends from spreading over the machine, and the
# progress bar out of the figures.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.encaps import generate_frames  # noqa: E402

from pneumoseg.config import load_config  # noqa: E402
from pneumoseg.stages import convert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EFFICIENCY_TARGET = 0.85
OVERHEAD_TARGET = 1.5


def make_inputs(samples: list[Path], count: int, folder: Path) -> None:
    """``count`` copies of ``samples`` in turn, as ``stage_2_images/ID_<hex>.dcm``."""
    images = folder / "stage_2_images"
    images.mkdir(parents=True)
    for i in range(count):
        shutil.copyfile(samples[i % len(samples)], images / f"ID_{i:09x}.dcm")


def floor_seconds(samples: list[Path], count: int, size: int) -> float:
    """Seconds to decode, resize and PNG-encode ``count`` images in memory, cycling through ``samples``."""
    frames = [next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1)) for path in samples]
    start = time.perf_counter()
    for i in range(count):
        pixels = np.asarray(Image.open(io.BytesIO(frames[i % len(frames)])))
        resized = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
        ok, _ = cv2.imencode(".png", resized)
        assert ok
    return time.perf_counter() - start


def stage_seconds(input_dir: Path, output_root: Path, size: int, n_jobs: int) -> float:
    """Seconds for one whole stage run into the empty folder ``output_root`` (removed afterwards)."""
    cfg = load_config(
        ROOT / "configs" / "base.yaml",
        [
            f"paths.input_dir={input_dir}",
            f"paths.output_root={output_root}",
            f"prepare.sizes=[{size}]",
            "prepare.interpolation=area",
            f"prepare.n_jobs={n_jobs}",
        ],
    )
    start = time.perf_counter()
    summary = convert.run(cfg)
    elapsed = time.perf_counter() - start
    shutil.rmtree(output_root)
    assert summary["failed"] == 0 and summary["converted"] == summary["images"], summary
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--siim-dir",
        type=Path,
        default=ROOT.parent / "shared" / "siim",
        help="folder holding sample_images/*.dcm (default: %(default)s)",
    )
    parser.add_argument("--images", type=int, default=300, help="DICOM copies to convert (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="PNG size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the best counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cv2.setNumThreads(1)

    samples = sorted((args.siim_dir / "sample_images").glob("*.dcm"))
    if not samples:
        print(f"no sample DICOMs in {args.siim_dir / 'sample_images'}; give --siim-dir", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]  # other work on the machine makes the parallel figure meaningless; say so
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        input_dir, output = Path(tmp) / "input", Path(tmp) / "output"
        make_inputs(samples, args.images, input_dir)
        # Warm-up: the workers start, the DICOMs are in the page cache.
        stage_seconds(input_dir, output, args.size, min(2, cores))
        # The three measurements take turns, so that a burst of load elsewhere hits them alike.
        floors, serials, parallels = [], [], []
        for _ in range(args.repeats):
            floors.append(floor_seconds(samples, args.images, args.size))
            serials.append(stage_seconds(input_dir, output, args.size, 1))
            if cores >= 2:
                parallels.append(stage_seconds(input_dir, output, args.size, 2))
    floor, serial = min(floors), min(serials)
    parallel = min(parallels) if parallels else None

    n = args.images
    overhead = serial / floor
    print(
        f"{n} copies of {len(samples)} real 1024x1024 JPEG DICOMs -> {args.size} px PNG; {cores} cores; "
        f"best of {args.repeats}; load average before: {load:.1f}"
    )
    print(f"floor (Pillow decode + OpenCV resize + PNG encode, in memory): {1000 * floor / n:.2f} ms/image")
    print(f"stage, 1 worker : {1000 * serial / n:.2f} ms/image, {n / serial:.1f} images/s")
    results = [
        ("overhead, stage / floor", f"{overhead:.2f}x", f"<= {OVERHEAD_TARGET:.2f}x", overhead <= OVERHEAD_TARGET)
    ]
    if parallel is None:
        print("stage, 2 workers: skipped, this machine has one core")
    else:
        efficiency = serial / (2 * parallel)
        print(f"stage, 2 workers: {1000 * parallel / n:.2f} ms/image, {n / parallel:.1f} images/s")
        results.append(
            (
                "parallel efficiency, 2 workers",
                f"{100 * efficiency:.0f}%",
                f">= {100 * EFFICIENCY_TARGET:.0f}%",
                efficiency >= EFFICIENCY_TARGET,
            )
        )
    for name, value, target, passed in results:
        print(f"{name:32s} {value:>7s}  target {target:8s} {'PASS' if passed else 'FAIL'}")
    return 0 if all(passed for *_, passed in results) else 1


if __name__ == "__main__":
    sys.exit(main())
