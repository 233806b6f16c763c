"""Benchmark of the fold ensemble: a 5-fold x hflip prediction against the 10 bare forward passes it is made of.

    python benchmarks/bench_predict.py [--config configs/demo.yaml] [--images 32] [--repeats 3] [key=value ...]
    python benchmarks/bench_predict.py --device cuda [--images 256]

Five models are built from the config's ``model`` block (random weights; the timing does not depend on them) and
predict the same ``--images`` random images at the config's size, ``predict.batch_size`` at a time:

* reference: per batch, each model's network called on the normalised batch and on its horizontal flip, prepared
  beforehand: 10 forward passes and nothing else;
* ensemble: :func:`pneumoseg.inference.tta.predict_probs` with ``TTA(hflip=True)``, from uint8 images to averaged
  float32 maps on the host (normalising, flipping back, sigmoids, averaging and copying included);
* predictor (for information): :meth:`pneumoseg.inference.predictor.Predictor.predict_prepared` plus run-length
  encoding, i.e. the ensemble, then each map brought back to ``--original`` px and post-processed there, as stage
  05 does.

Each figure is the best of ``--repeats`` interleaved runs after a warm-up. Target: ensemble time per image at most
1.1 x the reference's (the ensemble machinery adds at most 10%). Prints every figure and PASS/FAIL; exits 1 when
the target fails on the CPU. On a GPU both run under the same autocast (``predict.amp``) and channels_last.

``--members A.yaml B.yaml`` measures an ensemble of experiments instead (issue 12): 3 fold models of each member
config at its own size, hflip; reference: the sum of the members' bare forward passes (each model on its member's
prepared batches and their flips); ensemble:
:meth:`pneumoseg.inference.predictor.EnsemblePredictor.probabilities_prepared`, i.e. every member's TTA
probabilities brought back to ``--original`` px and blended there with the weights, as stage 05 does before the
post-processing. Same target::

    python benchmarks/bench_predict.py --members configs/demo.yaml configs/demo_b.yaml

``--runtimes`` compares torch with ONNX Runtime (issue 26) on the CPU, in one run and on the same batches: one model
of the demo config and one smp UNet-ResNet34 at 512 px (``configs/siim_unet_r34_512.yaml``, random weights), each
exported as stage 06 exports it (:mod:`pneumoseg.inference.runtime`, ONNX Runtime's threads as the predictor sets
them):

* forwards: the network on ``--images`` normalised random images, at batch 1 and at ``predict.batch_size``, torch
  against ONNX Runtime; target for UNet-ResNet34: ONNX Runtime at most 0.65 x torch's time at both batch sizes (the
  demo model's figure is printed beside);
* whole prediction: each image as a ``--original`` px JPEG DICOM's bytes, decoded, then the predictor on ONNX
  Runtime (resize, hflip TTA, resize back, post-processing) and its run-length string, one image at a time as the
  server sees them, against the same images' bare ONNX Runtime forwards (the image and its flip at batch 1); target
  at most 1.2 x for UNet-ResNet34::

    python benchmarks/bench_predict.py --runtimes [--images 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumoseg.config import load_config, to_dict
from pneumoseg.data.dicom import DicomTags, read_dicom_bytes, write_jpeg_dicom
from pneumoseg.data.resize import resize_square
from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor
from pneumoseg.inference.runtime import ONNXRUNTIME, intra_op_threads, with_runtime
from pneumoseg.inference.tta import TTA, predict_probs
from pneumoseg.modeling.device import autocast, resolve_device
from pneumoseg.modeling.models import build_model
from pneumoseg.modeling.normalize import normalize_from_model
from pneumoseg.postprocess.strategies import Threshold

ROOT = Path(__file__).resolve().parents[1]
RATIO_TARGET = 1.1
FOLDS = 5
MEMBER_FOLDS = 3
DEFAULT_CONFIGS = {"cpu": ROOT / "configs" / "demo.yaml", "cuda": ROOT / "configs" / "siim_unet_r34_512.yaml"}
RUNTIME_TARGET = 0.65
WHOLE_TARGET = 1.2
# (label, config, overrides, whether the targets apply): the demo's figures are printed beside the seed's.
RUNTIME_MODELS = {
    "demo": ("demo", ROOT / "configs" / "demo.yaml", [], False),
    "r34": (
        "UNet-ResNet34 512",
        ROOT / "configs" / "siim_unet_r34_512.yaml",
        ["model.params.encoder_weights=null"],
        True,
    ),
}


def fold_models(cfg, device: torch.device, count: int = FOLDS) -> list[FoldModel]:
    """``count`` differently seeded, randomly initialised models of the config, as stage 05 holds them."""
    block = to_dict(cfg.model)
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        net = build_model(block, pretrained=False).to(device).eval()
        if device.type == "cuda":
            net.to(memory_format=torch.channels_last)
        models.append(FoldModel(net=net, normalize=normalize_from_model(block), image_size=int(cfg.data.image_size)))
    return models


def reference_seconds(models: list[FoldModel], inputs: list[tuple[torch.Tensor, torch.Tensor]], amp) -> float:
    """Wall time of the bare forward passes: every model on every prepared batch and its flip."""
    device = inputs[0][0].device
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, amp):
        for x, flipped in inputs:
            for model in models:
                model.net(x)
                model.net(flipped)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def prepared_inputs(
    models: list[FoldModel], images: np.ndarray, batch: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The normalised batches of ``images`` and their horizontal flips, on ``device``: the reference's inputs."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    inputs = []
    for start in range(0, len(images), batch):
        x = models[0].normalize(torch.from_numpy(images[start : start + batch])).to(device)
        inputs.append(
            (x.contiguous(memory_format=memory_format), torch.flip(x, (-1,)).contiguous(memory_format=memory_format))
        )
    return inputs


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: demo on cpu, siim 512 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=None, help="images predicted per run (default 32 cpu, 256 cuda)")
    parser.add_argument("--original", type=int, default=1024, help="original image size for the predictor figure")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best counts")
    parser.add_argument(
        "--members",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="member configs: measure an ensemble of experiments (3 folds each) instead",
    )
    parser.add_argument(
        "--runtimes",
        action="store_true",
        help="compare torch with ONNX Runtime on the CPU (demo model and UNet-ResNet34 at 512 px)",
    )
    parser.add_argument(
        "--runtime-models",
        nargs="+",
        choices=sorted(RUNTIME_MODELS),
        default=list(RUNTIME_MODELS),
        help="with --runtimes: which models to measure (default both)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.runtimes:
        return runtime_benchmark(args)
    config = args.config or DEFAULT_CONFIGS[args.device]
    count = args.images or (256 if args.device == "cuda" else 32)
    cfg = load_config(config, args.overrides)
    device = resolve_device(args.device)
    size, batch, amp = int(cfg.data.image_size), int(cfg.predict.batch_size), cfg.predict.amp
    torch.backends.cudnn.benchmark = True

    if args.members:
        return ensemble_benchmark(args.members, args, count, device)
    models = fold_models(cfg, device)
    images = np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    inputs = prepared_inputs(models, images, batch, device)
    tta = TTA(hflip=True)
    predictor = Predictor(models, tta, Threshold(0.5, 0), batch_size=batch, amp=amp)
    shapes = [(args.original, args.original)] * count

    def ensemble():
        predict_probs(models, images, tta, batch_size=batch, amp=amp)

    def predict_and_encode():
        for start in range(0, count, batch):
            for prediction in predictor.predict_prepared(images[start : start + batch], shapes[start : start + batch]):
                prediction.rle()

    reference_seconds(models, inputs, amp)  # warm-up: allocator, kernel choice
    ensemble()
    reference_s, ensemble_s, predictor_s = [], [], []
    # Interleaved, so that drifting machine load hits every measurement alike.
    for _ in range(args.repeats):
        reference_s.append(reference_seconds(models, inputs, amp))
        ensemble_s.append(timed(ensemble))
        predictor_s.append(timed(predict_and_encode))

    per_image = {
        "reference (10 forward passes)": min(reference_s) / count,
        f"ensemble ({FOLDS} folds x hflip)": min(ensemble_s) / count,
        f"predictor + RLE at {args.original} px": min(predictor_s) / count,
    }
    ratio = min(ensemble_s) / min(reference_s)
    print(
        f"config {config}: {cfg.model.name}-{cfg.model.params.encoder_name} at {size} px, {FOLDS} models x "
        f"{len(tta.views())} views, batch {batch}, {count} images, device {device}"
        + (f", amp {amp}" if device.type == "cuda" else f", {torch.get_num_threads()} torch threads")
    )
    for name, seconds in per_image.items():
        print(f"  {name:32s}: {1000 * seconds:8.2f} ms/image  {1 / seconds:8.1f} images/s")
    print(f"  ratio ensemble / reference: {ratio:.3f} (target <= {RATIO_TARGET})")
    passed = ratio <= RATIO_TARGET
    print("PASS" if passed else "FAIL")
    return 0 if passed or device.type == "cuda" else 1


def ensemble_benchmark(configs: list[str], args, count: int, device: torch.device) -> int:
    """The ``--members`` benchmark (see the module docstring); returns the exit code."""
    cfgs = [load_config(path) for path in configs]
    tta = TTA(hflip=True)
    members, references = [], []
    rng = np.random.default_rng(0)
    # The same images at each member's size, as stage 01 writes them for each size.
    originals = rng.integers(0, 256, (count, args.original, args.original), dtype=np.uint8)
    images = {}
    for cfg in cfgs:
        size, batch = int(cfg.data.image_size), int(cfg.predict.batch_size)
        models = fold_models(cfg, device, MEMBER_FOLDS)
        images[size] = np.stack([resize_square(image, size) for image in originals])
        references.append((models, prepared_inputs(models, images[size], batch, device)))
        members.append(Predictor(models, tta, Threshold(0.5, 0), batch_size=batch, amp=cfg.predict.amp))
    ensemble = EnsemblePredictor(members, [1.0] * len(members), Threshold(0.5, 0), [str(c.experiment) for c in cfgs])
    shapes = [(args.original, args.original)] * count
    batch = int(cfgs[0].predict.batch_size)

    def reference() -> float:
        return sum(
            reference_seconds(models, inputs, cfg.predict.amp) for (models, inputs), cfg in zip(references, cfgs)
        )

    def blended():
        for start in range(0, count, batch):
            ensemble.probabilities_prepared(
                {size: part[start : start + batch] for size, part in images.items()}, shapes[start : start + batch]
            )

    reference()  # warm-up
    blended()
    reference_s, ensemble_s = [], []
    for _ in range(args.repeats):
        reference_s.append(reference())
        ensemble_s.append(timed(blended))
    ratio = min(ensemble_s) / min(reference_s)
    print(
        f"ensemble of {len(cfgs)} experiments ({', '.join(configs)}): "
        + ", ".join(f"{c.model.params.encoder_name} at {c.data.image_size} px" for c in cfgs)
        + f"; {MEMBER_FOLDS} folds x {len(tta.views())} views each, {count} images blended at {args.original} px, "
        f"device {device}, {torch.get_num_threads()} torch threads"
    )
    print(
        f"  reference ({len(cfgs) * MEMBER_FOLDS * len(tta.views())} bare forward passes): "
        f"{1000 * min(reference_s) / count:8.2f} ms/image"
    )
    print(f"  ensemble (TTA, back to {args.original} px, blend)     : {1000 * min(ensemble_s) / count:8.2f} ms/image")
    print(f"  ratio ensemble / reference: {ratio:.3f} (target <= {RATIO_TARGET})")
    passed = ratio <= RATIO_TARGET
    print("PASS" if passed else "FAIL")
    return 0 if passed or device.type == "cuda" else 1


def best_of(repeats: int, *runs) -> list[float]:
    """The best wall time of each of ``runs`` (callables) over ``repeats`` interleaved rounds, after a warm-up."""
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, found in zip(runs, times):
            found.append(timed(run))
    return [min(found) for found in times]


def forwards(net, batches: list[torch.Tensor]):
    """A callable: ``net`` on every batch."""

    def run():
        with torch.inference_mode():
            for x in batches:
                net(x)

    return run


def dicom_bodies(count: int, side: int) -> list[bytes]:
    """``count`` JPEG DICOM files of ``side`` px, as request bodies: a smooth chest-like gradient with noise."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:side, 0:side]
    bodies = []
    with tempfile.TemporaryDirectory() as folder:
        for k in range(count):
            pixels = np.clip((rows + cols) * (200 / (2 * side)) + rng.normal(0, 12, (side, side)), 0, 255)
            path = Path(folder) / f"{k}.dcm"
            write_jpeg_dicom(path, pixels.astype(np.uint8), DicomTags(f"1.2.{k}", "1.2.3", "1.2.3.4", f"p{k}"))
            bodies.append(path.read_bytes())
    return bodies


def runtime_rows(label: str, cfg, args, count: int) -> list[tuple[str, float, float]]:
    """``(what, reference seconds, measured seconds)`` per image of one model: torch against ONNX Runtime at batch 1
    and at ``predict.batch_size``, and the whole prediction against its ONNX Runtime forwards."""
    size, batch = int(cfg.data.image_size), int(cfg.predict.batch_size)
    [model] = fold_models(cfg, torch.device("cpu"), 1)
    [onnx] = with_runtime([model], ONNXRUNTIME, None)
    images = np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    x = model.normalize(torch.from_numpy(images)).contiguous()
    rows = []
    for batch_size in (1, batch):
        batches = [x[start : start + batch_size] for start in range(0, count, batch_size)]
        torch_s, onnx_s = best_of(args.repeats, forwards(model.net, batches), forwards(onnx.net, batches))
        rows.append((f"{label}: forward, batch {batch_size} (torch -> onnxruntime)", torch_s / count, onnx_s / count))
    bodies = dicom_bodies(count, args.original)
    predictor = Predictor([onnx], TTA(hflip=True), Threshold(0.5, 0), batch_size=1)
    views = [view for image in x for view in (image[None], torch.flip(image[None], (-1,)))]

    def whole():
        for body in bodies:
            pixels, _ = read_dicom_bytes(body)
            [prediction] = predictor.predict([pixels])
            prediction.rle()

    reference_s, whole_s = best_of(args.repeats, forwards(onnx.net, views), whole)
    rows.append(
        (
            f"{label}: whole prediction from a {args.original} px DICOM (onnxruntime forwards -> whole)",
            reference_s / count,
            whole_s / count,
        )
    )
    return rows


def runtime_benchmark(args) -> int:
    """The ``--runtimes`` benchmark (see the module docstring); returns the exit code."""
    count = args.images or 16
    passed = True
    print(
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; ONNX Runtime with {intra_op_threads()} "
        f"intra-op threads; {count} images, best of {args.repeats}"
    )
    print(f"| {'what':92s} | reference ms/img | measured ms/img | ratio | target |")
    for label, config, overrides, targeted in (RUNTIME_MODELS[name] for name in args.runtime_models):
        cfg = load_config(config, [*overrides, *args.overrides])
        for what, reference, measured in runtime_rows(label, cfg, args, count):
            target = WHOLE_TARGET if "whole" in what else RUNTIME_TARGET
            ratio = measured / reference
            passed &= ratio <= target or not targeted
            print(
                f"| {what:92s} | {1000 * reference:16.1f} | {1000 * measured:15.1f} | {ratio:5.2f} | "
                f"{f'<= {target}' if targeted else '(beside)':>6s} |",
                flush=True,
            )
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
