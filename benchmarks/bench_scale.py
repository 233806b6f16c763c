"""Benchmark of the whole pipeline at the real data's size: stages 00 to 06 on 12,047 + 3,205 synthetic DICOMs.

    python benchmarks/bench_scale.py [--fraction F] [--workdir DIR] [--against RESULTS.json] [--stages NN ...]
        [key=value ...]

Stage 00 writes a synthetic dataset with the challenge's stage-2 counts scaled by ``F`` (1024 px JPEG DICOMs),
then stages 01 to 06 run on it with ``configs/scale.yaml``: 512 px PNGs and masks (the real recipe's size) plus
the 64 px ones a tiny model trains on for one epoch per fold, so 5 folds of OOF maps, checkpoints, the search, the
test predictions and the package run over the real counts. Every stage runs as its own script in a subprocess,
exactly as a user runs it. Stage 00 resumes (a rerun keeps the DICOMs it already wrote); stages 01 to 06 always
run in full (``--force``).

For each stage it prints wall time, the CPU seconds of the stage's whole process tree (user + system time of the
script and every descendant it waited for, such as joblib and DataLoader workers: on a shared machine the wall
time is inflated by other jobs, the CPU time hardly), the peak RSS of that tree (sampled from /proc every 0.2 s;
pages shared between processes count once per process, so this overstates), the size of the stage's output
folder, and wall and CPU milliseconds per image (stage 00: per DICOM it wrote in this run). Then it times, in
process, stage 05's CPU work per test image apart from the forward passes (PNG decode, resize back to 1024,
post-processing, RLE) on up to 256 test images. The results go to ``DIR/results.json``; ``--against`` a
results file of another fraction prints each stage's wall and CPU ms/image ratios (a cost per image that grows
with the number of images shows as a ratio above 1). The last line is a one-line summary. Targets: peak RSS under 4 GB
in every stage; stage 05's non-forward CPU work under 20 ms per image. Exits 1 when a target fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pneumoseg import layout  # noqa: E402
from pneumoseg.config import load_config  # noqa: E402
from pneumoseg.data.resize import resize_probabilities  # noqa: E402
from pneumoseg.data.rle import encode  # noqa: E402
from pneumoseg.inference.predictor import Predictor  # noqa: E402
from pneumoseg.inference.tta import predict_probs  # noqa: E402
from pneumoseg.postprocess.strategies import build_postprocessor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "scale.yaml"
REAL_TRAIN, REAL_TEST = 12_047, 3_205
RSS_TARGET_GB = 4.0
CPU_TARGET_MS = 20.0
STAGES = (
    "00_make_demo_data",
    "01_convert_dicoms",
    "02_prepare_labels",
    "03_train",
    "04_search_thresholds",
    "05_predict",
    "06_package_model",
)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process /proc lists now."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                # The command name may hold spaces and parentheses: the fields after the last ')' are fixed.
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def tree_memory(root: int) -> tuple[int, int]:
    """Resident bytes of ``root`` and all its descendants: the sum of their RSS (pages shared between them, such
    as torch's libraries in every DataLoader worker, count once per process) and of their PSS (shared pages
    split between the processes sharing them: the memory the tree really holds)."""
    tree, totals, todo = _children(), {"Rss:": 0, "Pss:": 0}, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.split(maxsplit=1)[0] in totals:
                    totals[line.split()[0]] += int(line.split()[1]) * 1024
        except (OSError, IndexError):  # ended while we looked
            continue
    return totals["Rss:"], totals["Pss:"]


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def adopt_orphans() -> None:
    """Make this process the reaper of its orphaned descendants (Linux), so that workers a stage leaves behind
    when it exits (joblib's loky workers outlive the script that started them) are reaped here and their CPU
    time counts in ``RUSAGE_CHILDREN`` instead of going to init with them."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_orphans(timeout_s: float = 120.0) -> int:
    """Wait for the orphans a finished stage left to this process (see :func:`adopt_orphans`), at most
    ``timeout_s`` seconds; returns how many are still running then (their CPU time is missing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no children left
            return 0
        if not pid:
            time.sleep(0.05)
    return len(_children().get(os.getpid(), []))


def children_cpu_s() -> float:
    """User + system CPU seconds of every child this process has waited for, and of their waited-for
    descendants (the kernel adds a process's children's times to it when it is reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(script: str, arguments: list[str], log_path: Path) -> dict:
    """Run one stage script as a subprocess; its wall time, the CPU time of its process tree, its peak
    process-tree RSS and PSS, and its exit code. Stages run one at a time, so the growth of this process's
    children's CPU time over the run is the stage's alone."""
    peak, done = [0, 0], threading.Event()
    with open(log_path, "w") as log:
        start, cpu_start = time.perf_counter(), children_cpu_s()
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

        def sample() -> None:
            while not done.wait(0.2):
                peak[:] = map(max, peak, tree_memory(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        left = reap_orphans()
        done.set()
        sampler.join()
    if left:
        print(f"warning: {left} process(es) of {script} still running; its CPU time misses theirs", flush=True)
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": children_cpu_s() - cpu_start,
        "peak_rss_gb": peak[0] / 2**30,
        "peak_pss_gb": peak[1] / 2**30,
        "rc": code,
    }


def stage_folders(cfg) -> dict[str, Path]:
    """Each stage's output folder, whose size is the stage's disk written."""
    return dict(
        zip(
            STAGES,
            (
                Path(cfg.paths.input_dir),
                layout.convert_dir(cfg),
                layout.labels_dir(cfg),
                layout.train_dir(cfg),
                layout.search_dir(cfg),
                layout.predict_dir(cfg),
                layout.package_dir(cfg),
            ),
        )
    )


def dicoms_written(folder: Path, started: float) -> int:
    """DICOMs stage 00 wrote in its run that began at ``started`` (``time.time()``): its ``done.json``
    summary's count when the run rewrote it, 0 when the stage found its data complete and skipped. A resumed run
    writes only the missing ones, which are then the denominator of its cost per image."""
    done = folder / "done.json"
    if not done.is_file() or done.stat().st_mtime < started:
        return 0
    return int(json.loads(done.read_text())["summary"]["written"])


def stage_images(n_train: int, n_test: int) -> dict[str, int]:
    """The images each stage handles, the denominator of its cost per image."""
    total = n_train + n_test
    return dict(zip(STAGES, (total, total, total, n_train, n_train, n_test, n_test)))


def _time_parts(
    read, probs_of, postprocessor, ids: list[str], sizes: list[tuple[int, int]], batch: int
) -> dict[str, float]:
    """CPU milliseconds per image of each part of stage 05's work over ``ids``, each part timed alone, on one
    thread (as in stage 05, whose DataLoader workers are the parallelism). CPU time, not wall time: on a shared
    machine other jobs' load inflates wall time, not this figure.

    Args:
        read: ImageId -> uint8 image (the PNG decode).
        probs_of: N x S x S uint8 images -> N x S x S float32 probabilities (the forward passes).
        postprocessor: probabilities at the original size -> boolean mask.
        ids: the images; sizes: their original ``(rows, cols)``; batch: images per call of ``probs_of``.
    """
    times = dict.fromkeys(("decode", "forward", "resize_back", "postprocess", "rle"), 0.0)
    for start in range(0, len(ids), batch):
        clock = [time.process_time()]
        images = np.stack([read(i) for i in ids[start : start + batch]])
        clock.append(time.process_time())
        probs = probs_of(images)
        clock.append(time.process_time())
        times["decode"] += clock[1] - clock[0]
        times["forward"] += clock[2] - clock[1]
        for small, (rows, cols) in zip(probs, sizes[start : start + batch]):
            clock = [time.process_time()]
            full = resize_probabilities(small, rows, cols)
            clock.append(time.process_time())
            mask = postprocessor(full)
            clock.append(time.process_time())
            encode(mask)
            clock.append(time.process_time())
            for part, before, after in zip(("resize_back", "postprocess", "rle"), clock, clock[1:]):
                times[part] += after - before
    per_image = {part: 1000 * seconds / len(ids) for part, seconds in times.items()}
    per_image["non_forward"] = sum(v for part, v in per_image.items() if part != "forward")
    return per_image


def stand_in_probs(images: np.ndarray) -> np.ndarray:
    """Smooth probability maps with blobs of every size from the X-rays themselves (bright lung-free regions
    near 1), so that thresholds and component filters do real work at the recipe's size."""
    blurred = np.stack([cv2.GaussianBlur(image, (0, 0), image.shape[0] / 64) for image in images])
    return (blurred.astype(np.float32) / 255) ** 2


def stage05_cpu_cost(cfg, limit: int = 256) -> dict[str, dict[str, float]]:
    """Stage 05's CPU work per test image apart from the forward passes, on up to ``limit`` test images.

    Two measurements, each part timed alone:

    * ``experiment``: this run's predictor (its models, TTA, post-processing chosen by stage 04) on the CPU,
      over the PNGs at the models' size;
    * ``recipe``: the real recipe's 512 px PNGs with stand-in probability maps (:func:`stand_in_probs`, no
      forward pass) and the base config's default post-processing candidates at their most expensive (the
      ``triplet`` rule with a low top threshold, so that most images keep a mask).
    """
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    predictor = Predictor.from_experiment(cfg, device="cpu")
    test = pd.read_csv(layout.test_images_path(cfg), dtype={"ImageId": str}).head(limit)
    ids, sizes = test.ImageId.tolist(), [(int(r), int(c)) for r, c in zip(test.rows, test.cols)]

    def reader(size: int):
        folder = layout.images_dir(cfg, size)
        return lambda image_id: cv2.imread(str(folder / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)

    def forward(images: np.ndarray) -> np.ndarray:
        return predict_probs(
            predictor.models, images, predictor.tta, batch_size=predictor.batch_size, amp=predictor.amp
        )

    recipe_post = build_postprocessor(
        {"name": "triplet", "params": {"top": 0.4, "min_area": 250, "bottom": 0.2, "min_component_area": 100}}
    )
    return {
        "experiment": _time_parts(
            reader(predictor.image_size), forward, predictor.postprocessor, ids, sizes, predictor.batch_size
        ),
        "recipe": _time_parts(
            reader(int(cfg.data.image_size)), stand_in_probs, recipe_post, ids, sizes, predictor.batch_size
        ),
        "images": len(ids),
    }


def ratio_to(row: dict, other: dict | None, key: str) -> str:
    """``row[key]`` over ``other[key]`` as text, or "-" where the other run lacks it (older results files have
    no CPU figures)."""
    return f"{row[key] / other[key]:.2f}x" if other and other.get(key) else "-"


def print_table(rows: dict[str, dict], against: dict | None) -> None:
    """The per-stage table; with ``against``, each stage's wall and CPU ms/image ratios to the other run's."""
    print(
        f"{'stage':22s} {'images':>7s} {'wall s':>8s} {'CPU s':>8s} {'RSS GB':>7s} {'PSS GB':>7s} "
        f"{'disk MB':>9s} {'ms/image':>9s} {'CPU ms/im':>9s}" + ("  vs other run: wall, CPU" if against else "")
    )
    for stage, row in rows.items():
        ratios = ""
        if against and not row["reused"]:
            other = against["stages"].get(stage)
            ratios = f"  {ratio_to(row, other, 'ms_per_image')}, {ratio_to(row, other, 'cpu_ms_per_image')}"
        print(
            f"{stage:22s} {row['images']:7d} {row['wall_s']:8.1f} {row['cpu_s']:8.1f} {row['peak_rss_gb']:7.2f} "
            f"{row['peak_pss_gb']:7.2f} {row['disk_mb']:9.1f} {row['ms_per_image']:9.2f} "
            f"{row['cpu_ms_per_image']:9.2f}{ratios}"
            + ("  (reused: complete before this run)" if row["reused"] else "")
        )


def print_cpu_cost(cost: dict) -> None:
    """Stage 05's non-forward CPU work per image, part by part."""
    for name, parts in cost.items():
        if name != "images":
            print(
                f"stage 05 CPU ms per test image ({name}): "
                + ", ".join(f"{part} {parts[part]:.2f}" for part in ("decode", "resize_back", "postprocess", "rle"))
                + f"; non-forward {parts['non_forward']:.2f} (target < {CPU_TARGET_MS}); forward "
                + f"{parts['forward']:.2f}; {cost['images']} images"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=1.0, help="scales both image counts (default 1)")
    parser.add_argument("--workdir", default=None, help="where data and outputs go (default /tmp/pneumoseg_scale/F)")
    parser.add_argument("--against", default=None, help="results.json of another fraction to compare with")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=None,
        metavar="NN",
        help="run only these stages (by number, e.g. 05 06) on the workdir's earlier outputs",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every stage")
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must lie in (0, 1]")
    n_train, n_test = max(10, round(REAL_TRAIN * args.fraction)), max(2, round(REAL_TEST * args.fraction))
    work = Path(args.workdir or f"/tmp/pneumoseg_scale/{args.fraction:g}").resolve()
    overrides = [
        f"paths.input_dir={work / 'input'}",
        f"paths.output_root={work / 'output'}",
        f"demo.n_train={n_train}",
        f"demo.n_test={n_test}",
        *args.overrides,
    ]
    cfg = load_config(CONFIG, overrides)
    folders, images = stage_folders(cfg), stage_images(n_train, n_test)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    adopt_orphans()
    print(
        f"scale run: {n_train} train + {n_test} test images (fraction {args.fraction:g}) in {work}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    rows: dict[str, dict] = {}
    selected = [s for s in STAGES if args.stages is None or s[:2] in args.stages]
    for stage in selected:
        force = [] if stage == STAGES[0] else ["--force"]
        started = time.time()
        row = run_stage(stage, ["--config", str(CONFIG), *force, *overrides], work / "logs" / f"{stage}.log")
        written = None if force else dicoms_written(folders[stage], started)
        count, reused = written or images[stage], written == 0
        row.update(
            images=count,
            disk_mb=folder_bytes(folders[stage]) / 2**20,
            reused=reused,
            ms_per_image=1000 * row["wall_s"] / count,
            cpu_ms_per_image=1000 * row["cpu_s"] / count,
        )
        rows[stage] = row
        print(
            f"{stage}: {row['wall_s']:.1f} s ({row['cpu_s']:.1f} CPU s), peak RSS {row['peak_rss_gb']:.2f} GB "
            f"(PSS {row['peak_pss_gb']:.2f}), "
            f"{row['disk_mb']:.1f} MB, {row['ms_per_image']:.2f} ms/image ({row['cpu_ms_per_image']:.2f} CPU)"
            + (" (reused)" if reused else ""),
            flush=True,
        )
        if row["rc"]:
            print(f"FAIL: {stage} exited {row['rc']}; see {work / 'logs' / (stage + '.log')}")
            return 1
    cost = stage05_cpu_cost(cfg)
    results = {"fraction": args.fraction, "n_train": n_train, "n_test": n_test, "stages": rows, "stage05_cpu": cost}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print_table(rows, json.loads(Path(args.against).read_text()) if args.against else None)
    print_cpu_cost(cost)
    worst = max(rows, key=lambda s: rows[s]["peak_pss_gb"])
    cpu = max(cost["experiment"]["non_forward"], cost["recipe"]["non_forward"])
    passed = max(r["peak_rss_gb"] for r in rows.values()) < RSS_TARGET_GB and cpu < CPU_TARGET_MS
    wall, cpu_s = (sum(r[key] for r in rows.values()) for key in ("wall_s", "cpu_s"))
    print(
        f"SUMMARY fraction {args.fraction:g} ({n_train}+{n_test} images): {wall:.0f} s in all ({cpu_s:.0f} CPU s); "
        f"peak memory {rows[worst]['peak_pss_gb']:.2f} GB PSS "
        f"({worst}), max tree RSS {max(r['peak_rss_gb'] for r in rows.values()):.2f} GB (target < {RSS_TARGET_GB}); "
        f"stage 05 non-forward CPU {cpu:.1f} ms/image (target < {CPU_TARGET_MS}): {'PASS' if passed else 'FAIL'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
