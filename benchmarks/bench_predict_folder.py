"""Benchmark of ``pneumoseg predict`` on a folder: the whole command's time per image against the model's forward
passes on the same images, and the command's peak memory at two folder sizes.

    python benchmarks/bench_predict_folder.py [--config configs/demo.yaml] [--model PACKAGE] [--images 100]
        [--side 1024] [--counts 100 1000] [--count-side 256] [--workers 1] [--batch-size 8]

* The model: ``--model`` (a stage-06 package), or by default a package of the config's architecture with random
  weights (its folds, ``predict.top_k`` checkpoints each, its TTA and post-processing; the timing does not depend
  on the weights, except what depends on the masks: outlines, run-lengths, PNG sizes), built in a temporary
  folder.
* Time: ``--images`` challenge-like DICOMs of ``--side`` px (JPEG baseline, as the challenge's; or the first
  ``--images`` DICOMs under ``--input``, such as the demo's test set, which with the trained demo package give
  masks, outlines and run-lengths like real ones rather than a random model's noise) go through the whole command
  in this process (:func:`pneumoseg.inference.folder.run`: decoding in ``--workers`` processes, prediction,
  resizing back, post-processing, RLE, masks, overlays, DICOM SEG, the CSV and the review page; the model loaded
  beforehand). Reference: the same images, decoded and resized to the models' size beforehand, through
  :meth:`Predictor.model_probabilities`, the models' forward passes with their TTA views and nothing else. Each is
  the best of ``--repeats`` runs. The command runs on all the images and on their first half: the difference per
  image is its cost per image once running, the rest its start-up (the worker processes, the first batch; a folder
  of thousands pays it once). Target: the cost per image at most 1.2x the forward passes; the whole time per image
  is printed beside. Then each step's time per image, one image at a time in this process (where the time goes).
* Memory: the command runs as a child process on ``--counts`` folders of ``--count-side`` px DICOMs and reports its
  peak resident memory (its own process; each decoding worker holds a file or two); flat means nothing is held
  per image.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from pneumoseg.config import load_config
from pneumoseg.data.dicom import DicomTags, read_dicom, write_jpeg_dicom
from pneumoseg.data.resize import resize_probabilities
from pneumoseg.inference import folder
from pneumoseg.inference.dicom_seg import write_segmentation
from pneumoseg.inference.outputs import caption
from pneumoseg.inference.predictor import make_predictions
from pneumoseg.inference.sources import read_source
from pneumoseg.io import write_jpeg, write_png
from pneumoseg.reports.review import overlay

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.2


def write_dicoms(root: Path, count: int, side: int) -> Path:
    """``count`` challenge-like DICOMs of ``side`` px (blurred noise) in ``root``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        pixels = cv2.GaussianBlur(rng.integers(0, 256, (side, side), dtype=np.uint8), (0, 0), side / 64)
        write_jpeg_dicom(root / f"{k:05d}.dcm", pixels, DicomTags(f"1.2.3.{k}", f"1.2.4.{k}", f"1.2.5.{k}", f"p{k}"))
    return root


def build_package(config: Path, overrides: list[str], work: Path) -> Path:
    """A stage-06 package of the config's architecture with random weights, built under ``work``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_experiment import write_fake_training
    from pneumoseg import layout
    from pneumoseg.stages import package

    cfg = load_config(config, [f"paths.output_root={work}", f"paths.input_dir={work / 'input'}", *overrides])
    write_fake_training(cfg, folds=range(int(cfg.folds.n_splits)), per_fold=int(cfg.predict.top_k))
    package.run(cfg)
    return layout.package_path(cfg)


def time_command(model: folder.Model, images: Path, work: Path, args: argparse.Namespace) -> float:
    """Seconds of the whole command on ``images`` (the best of ``--repeats`` fresh runs, each with its own worker
    processes)."""
    best = float("inf")
    for repeat in range(args.repeats):
        output = work / f"out-{images.name}-{repeat}"
        started = time.perf_counter()
        folder.run(model, images, output, args.batch_size, args.workers)
        best = min(best, time.perf_counter() - started)
        shutil.rmtree(output)
    return best


def first_half(images: Path) -> Path:
    """A folder beside ``images`` with its first half of the DICOMs (links)."""
    half = images.with_name(f"{images.name}-half")
    half.mkdir()
    files = sorted(images.glob("*.dcm"))
    for path in files[: len(files) // 2]:
        os.link(path, half / path.name)
    return half


def copy_dicoms(source: Path, root: Path, count: int) -> Path:
    """The first ``count`` DICOMs under ``source`` (sorted, found recursively), copied flat into ``root``."""
    root.mkdir(parents=True)
    found = sorted(source.rglob("*.dcm"))[:count]
    if len(found) < count:
        raise SystemExit(f"--input {source} holds {len(found)} DICOMs, fewer than --images {count}")
    for k, path in enumerate(found):
        shutil.copyfile(path, root / f"{k:05d}.dcm")
    return root


def time_forwards(model: folder.Model, images: Path, args: argparse.Namespace) -> float:
    """Seconds per image of the models' forward passes (with TTA) on the same images, decoded and resized first."""
    pixels = [read_dicom(path)[0] for path in sorted(images.glob("*.dcm"))]
    predictor = model.predictor
    prepared = [predictor.prepare(pixels[k : k + args.batch_size]) for k in range(0, len(pixels), args.batch_size)]
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        for batch in prepared:
            predictor.model_probabilities(batch)
        best = min(best, time.perf_counter() - started)
    return best / len(pixels)


def step_times(model: folder.Model, images: Path, work: Path) -> dict[str, float]:
    """Milliseconds per image of each step of the command, one image at a time in this process (after one image of
    warm-up, which pays for first-use imports and tables): where an image's time goes."""
    times: dict[str, float] = defaultdict(float)

    def timed(step: str, function, *arguments):
        started = time.perf_counter()
        result = function(*arguments)
        times[step] += time.perf_counter() - started
        return result

    sources = sorted(path.name for path in images.glob("*.dcm"))
    for source in sources[:1] + sources:
        if source is sources[0] and times:
            times.clear()  # the warm-up is over
        image = timed("read the DICOM", read_source, images, source, False)
        prepared = timed("resize to the model's size", model.predictor.prepare, [image.pixels])
        probs, gates = timed("forward passes with TTA", model.predictor.model_probabilities, prepared)
        full = timed("resize back", resize_probabilities, probs[0], *image.pixels.shape)
        [made] = timed("post-process", make_predictions, [full], gates, model.predictor.postprocessor)
        timed("RLE", made.rle, model.fmt)
        timed("mask PNG", write_png, work / "mask.png", made.mask.astype(np.uint8) * 255)
        picture = timed("overlay", overlay, image.pixels, made.probs, made.mask, caption(image, full, made.mask), True)
        timed("overlay JPEG", write_jpeg, work / "overlay.jpg", picture)
        timed("DICOM SEG", write_segmentation, work / "seg.dcm", image.header, made.mask, model.name, model.version)
    return {step: 1000 * seconds / len(sources) for step, seconds in times.items()}


def child(args: argparse.Namespace) -> None:
    """Run the command once (``--child PACKAGE IMAGES OUTPUT``) and print its peak memory as JSON."""
    package, images, output = args.child
    code = folder.main(
        [
            "--model",
            package,
            "--input",
            images,
            "--output",
            output,
            "--workers",
            str(args.workers),
            "--batch-size",
            str(args.batch_size),
        ]
    )
    print(json.dumps({"code": code, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(package: Path, images: Path, output: Path, args: argparse.Namespace) -> dict:
    """The command's peak memory on ``images``, in a fresh process."""
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(package),
            str(images),
            str(output),
            "--workers",
            str(args.workers),
            "--batch-size",
            str(args.batch_size),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--model", type=Path, help="a stage-06 package (default: the config's, random weights)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--input", type=Path, help="time the first --images DICOMs under this folder instead")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--counts", type=int, nargs=2, default=[100, 1000])
    parser.add_argument("--count-side", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("PACKAGE", "IMAGES", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-predict-folder-") as tmp:
        work = Path(tmp)
        package = args.model or build_package(args.config, args.overrides, work / "model")
        images = (
            copy_dicoms(args.input, work / "time", args.images)
            if args.input
            else write_dicoms(work / "time", args.images, args.side)
        )
        with folder.open_model(package, device="cpu") as model:
            forwards = time_forwards(model, images, args)
            whole = time_command(model, images, work, args)
            half = time_command(model, first_half(images), work, args)
            steps = step_times(model, images, work)
            views = model.predictor.n_views // len(model.predictor.models)
            print(
                f"model {model.name}: {len(model.predictor.models)} models x {views} views, {args.images} DICOMs "
                f"{f'from {args.input}' if args.input else f'of {args.side} px'}, batch {args.batch_size}, "
                f"{args.workers} decoding workers"
            )
        steady = (whole - half) / (args.images - args.images // 2)
        ratio = steady / forwards
        print(
            f"forward passes: {forwards * 1000:.1f} ms/image; the whole command: {whole / args.images * 1000:.1f} "
            f"ms/image over {args.images} images ({whole / args.images / forwards:.2f}x), of which a start-up of "
            f"{whole - steady * args.images:.2f} s (the worker processes, the first batch) and "
            f"{steady * 1000:.1f} ms per image (the time {args.images} images take over {args.images // 2}): "
            f"ratio {ratio:.2f}x (target <= {TARGET}x): {'PASS' if ratio <= TARGET else 'FAIL'}"
        )
        print(
            "one image at a time on one process, ms per image: "
            + ", ".join(f"{step} {ms:.1f}" for step, ms in steps.items())
            + f"; all but the forwards {sum(ms for step, ms in steps.items() if not step.startswith('forward')):.1f}"
        )
        for count in args.counts:
            memory = peak_memory(
                package, write_dicoms(work / f"n{count}", count, args.count_side), work / f"out_n{count}", args
            )
            print(
                f"{count} DICOMs of {args.count_side} px: peak memory of the command's process "
                f"{memory['peak_mb']:.0f} MB"
            )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
