"""Benchmark of ``train.torch_threads``: the demo's stage 03 with torch's old default threads against ``auto``.

    python benchmarks/bench_threads.py [--config configs/demo.yaml] [--epochs 2] [--images 120] [--workdir DIR]
                                       [key=value ...]

Stages 00-02 make a smaller demo dataset (``--images`` labelled images, 10 test images) once in ``--workdir``
(default: a temporary folder), to keep the run to a few minutes; then stage 03 trains fold 0 of
the demo recipe for ``--epochs`` epochs twice, each in a process of its own (torch's thread count is per process):
once with ``train.torch_threads=null`` (torch's default, one thread per core: the setting before ``auto``) and once
with ``train.torch_threads=auto`` (the cores this process may use less ``train.num_workers``, at least 1). The
figure is the median epoch time of each run (``log.csv``'s ``seconds``) and their ratio, default / auto; above 1
means ``auto`` is faster. On a machine shared with other work the figures move with the load: read the ratio, which
both runs of one invocation share, and say how loaded the machine was.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default": "null", "auto": "auto"}


def run_script(script: str, config: Path, overrides: list[str]) -> None:
    """Run ``scripts/<script>`` on ``config`` with ``overrides``; stop the benchmark when it fails."""
    command = [sys.executable, str(ROOT / "scripts" / script), "--config", str(config), *overrides]
    # Without OMP_NUM_THREADS (which the test runner sets to 1) torch starts at its own default, as a user's shell.
    environ = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    environ["TQDM_DISABLE"] = "1"
    if subprocess.run(command, cwd=ROOT, env=environ).returncode != 0:
        sys.exit(f"{script} failed; see its messages above")


def epoch_seconds(output_root: Path, experiment: str) -> list[float]:
    """The ``seconds`` column of fold 0's ``log.csv`` of ``experiment``."""
    return pd.read_csv(output_root / experiment / "03_train" / "fold0" / "log.csv")["seconds"].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of fold 0 per setting (default %(default)s)")
    parser.add_argument("--images", type=int, default=120, help="labelled demo images (default %(default)s)")
    parser.add_argument("--workdir", type=Path, help="where the demo data and runs go (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as temporary:
        workdir = (args.workdir or Path(temporary)).resolve()
        shared = [
            f"paths.input_dir={workdir / 'input'}",
            f"paths.output_root={workdir / 'output'}",
            f"demo.n_train={args.images}",
            "demo.n_test=10",
            *args.overrides,
        ]
        for script in ("00_make_demo_data.py", "01_convert_dicoms.py", "02_prepare_labels.py"):
            run_script(script, args.config, shared)
        medians = {}
        for name, setting in SETTINGS.items():
            experiment = f"bench_threads_{name}"
            run_script(
                "03_train.py",
                args.config,
                [
                    *shared,
                    f"experiment={experiment}",
                    "train.folds=[0]",
                    f"train.epochs={args.epochs}",
                    f"train.torch_threads={setting}",
                ],
            )
            seconds = epoch_seconds(workdir / "output", experiment)
            medians[name] = statistics.median(seconds)
            print(
                f"train.torch_threads={setting}: epochs of {', '.join(f'{s:.1f}' for s in seconds)} s "
                f"(median {medians[name]:.1f} s)",
                flush=True,
            )
    cores = len(os.sched_getaffinity(0))
    print(
        f"{cores} usable cores, load average {os.getloadavg()[0]:.1f}: default / auto = "
        f"{medians['default'] / medians['auto']:.2f}x",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
