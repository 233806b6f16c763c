"""Benchmark of pneumoseg.data.rle against the challenge's own per-pixel codec, measured in the same run.

    python benchmarks/bench_rle.py [--siim-dir ../shared/siim] [--repeats 5]

Targets (from the issue):

* encode: a 1024x1024 mask at least 200x faster than a per-pixel Python loop (the challenge's ``mask2rle``,
  with its bug fixed: it dropped a run that ends on the last pixel). Real masks from ``stage_2_train.csv``
  when it is there, synthetic ones otherwise.
* decode: all 12,954 rows of ``stage_2_train.csv`` in under 3 s on one core (skipped without the file).
  The challenge's ``rle2mask`` (a Python loop over runs) is timed on a sample of rows as a reference.

Prints every figure and PASS/FAIL per target; exits 1 when a target fails.
"""

from __future__ import annotations

import os

# One core: keep any threaded numpy/OpenCV backend from spreading over the machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from pneumoseg.data import rle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 1024
ENCODE_TARGET = 200.0
ENCODE_CALLS = 200  # rle.encode calls per timing round: about as long as one reference call
DECODE_TARGET_S = 3.0


def reference_encode(mask: np.ndarray) -> str:
    """The challenge's ``mask2rle``: walk every pixel column by column in Python (relative form)."""
    height, width = mask.shape
    values: list[int] = []
    run_start, run_length, since_last_run, previous = -1, 0, 0, False
    for x in range(width):
        for y in range(height):
            current = bool(mask[y, x])
            if current != previous:
                if current:
                    run_start, run_length = since_last_run, 1
                else:
                    values += [run_start, run_length]
                    run_start, run_length, since_last_run = -1, 0, 0
            elif run_start > -1:
                run_length += 1
            previous = current
            since_last_run += 1
    if run_start > -1:  # the original forgot this: a run that reaches the last pixel was dropped
        values += [run_start, run_length]
    return " ".join(map(str, values)) if values else rle.EMPTY


def reference_decode(text: str, height: int, width: int) -> np.ndarray:
    """The challenge's ``rle2mask``: a Python loop over the runs of a relative-form string."""
    mask = np.zeros(width * height, dtype=np.uint8)
    if text.strip() != rle.EMPTY:
        values = [int(token) for token in text.split()]
        position = 0
        for gap, length in zip(values[0::2], values[1::2]):
            position += gap
            mask[position : position + length] = 255
            position += length
    return mask.reshape(width, height).T


def per_call(fn, number: int, repeats: int) -> float:
    """Seconds per call of ``fn``: ``repeats`` rounds of ``number`` calls, the fastest round kept (the one least
    disturbed by other work on the machine). Give both sides of a ratio rounds of similar length, so that
    neither gets more chances to hit a quiet moment."""
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - start) / number)
    return min(rounds)


def synthetic_masks() -> dict[str, np.ndarray]:
    """Lesion-like masks: a thin crescent along the lung edge, a large blob, scattered islands, a full mask."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    rng = np.random.default_rng(0)
    crescent = ((rows - 500) / 420) ** 2 + ((cols - 300) / 180) ** 2
    islands = np.zeros((SIZE, SIZE), dtype=bool)
    for row, col in rng.integers(100, SIZE - 100, size=(40, 2)):
        islands[row - 8 : row + 8, col - 5 : col + 5] = True
    return {
        "synthetic crescent": (crescent < 1) & (crescent > 0.8),
        "synthetic large blob": ((rows - 520) / 300) ** 2 + ((cols - 700) / 200) ** 2 < 1,
        "synthetic islands": islands,
        "synthetic full": np.ones((SIZE, SIZE), dtype=bool),
    }


def real_rows(siim_dir: Path) -> list[str] | None:
    path = siim_dir / "stage_2_train.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        return [row["EncodedPixels"] for row in csv.DictReader(handle)]


def real_masks(rows: list[str]) -> dict[str, np.ndarray]:
    """The real instance masks with the median and the largest area."""
    positive = sorted((r for r in rows if r != rle.EMPTY), key=lambda r: sum(map(int, r.split()[1::2])))
    return {
        "real median-area instance": rle.decode(positive[len(positive) // 2], SIZE, SIZE),
        "real largest instance": rle.decode(positive[-1], SIZE, SIZE),
    }


def bench_encode(masks: dict[str, np.ndarray], repeats: int) -> bool:
    print(
        f"encode, {SIZE}x{SIZE} masks (best of {repeats} rounds: 1 reference call, {ENCODE_CALLS} rle.encode "
        f"calls a round):"
    )
    ratios = []
    for name, mask in masks.items():
        if reference_encode(mask) != rle.encode(mask):
            raise SystemExit(f"BUG: rle.encode disagrees with the reference on {name}")
        reference = per_call(lambda mask=mask: reference_encode(mask), 1, repeats)
        ours = per_call(lambda mask=mask: rle.encode(mask), ENCODE_CALLS, repeats)
        ratios.append(reference / ours)
        print(
            f"  {name:28s} area {int(mask.sum()):8d}  reference {reference * 1e3:8.1f} ms  "
            f"rle.encode {ours * 1e3:7.3f} ms  speed-up {reference / ours:8.0f}x"
        )
    worst = min(ratios)
    ok = worst >= ENCODE_TARGET
    print(f"  worst speed-up {worst:.0f}x (target >= {ENCODE_TARGET:.0f}x): {'PASS' if ok else 'FAIL'}")
    return ok


def bench_decode(rows: list[str], repeats: int) -> bool:
    def decode_all():
        for text in rows:
            rle.decode(text, SIZE, SIZE)

    sample = rows[:: max(1, len(rows) // 500)]
    reference = per_call(lambda: [reference_decode(text, SIZE, SIZE) for text in sample], 1, repeats)
    ours_sample = per_call(lambda: [rle.decode(text, SIZE, SIZE) for text in sample], 1, repeats)
    ours_all = per_call(decode_all, 1, max(1, repeats // 2))
    ok = ours_all < DECODE_TARGET_S
    print(f"decode ({SIZE}x{SIZE}):")
    print(
        f"  {len(sample)} sampled rows: reference {reference:.3f} s, rle.decode {ours_sample:.3f} s, "
        f"speed-up {reference / ours_sample:.1f}x"
    )
    print(
        f"  all {len(rows)} rows: {ours_all:.2f} s ({ours_all / len(rows) * 1e6:.0f} us a row; "
        f"target < {DECODE_TARGET_S:.0f} s): {'PASS' if ok else 'FAIL'}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--siim-dir",
        type=Path,
        default=ROOT.parent / "shared" / "siim",
        help="folder with the challenge's stage_2_train.csv (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds; the fastest is kept")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    rows = real_rows(args.siim_dir)
    if rows is None:
        print(
            f"{args.siim_dir / 'stage_2_train.csv'} not found: encode uses synthetic masks only; "
            f"decode benchmark skipped"
        )
    masks = synthetic_masks() if rows is None else {**real_masks(rows), **synthetic_masks()}
    results = [bench_encode(masks, args.repeats)]
    if rows is not None:
        results.append(bench_decode(rows, args.repeats))
    print("PASS" if all(results) else "FAIL")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
