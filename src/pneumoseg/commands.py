"""The ``pneumoseg`` command: one entry point (``[project.scripts]``) with the pipeline's subcommands.

::

    pneumoseg run [CONFIG] [--from NN] [--to NN] [--force] [key=value ...]   # the pipeline, as bash run_all.sh
    pneumoseg status --config CONFIG                                          # as python scripts/status.py
    pneumoseg leaderboard | validate | serve | predict ...

Each subcommand is a ``module:function`` of :data:`COMMANDS`, imported only when it runs (so that one command's
heavy imports never slow another, and so that this module imports no stage); the function takes the remaining
arguments and returns the exit code. The numbered scripts and ``run_all.sh`` stay, and call the same functions.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# name -> ("module:function", what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pneumoseg.commands:run_pipeline", "run the pipeline's stages on a config (as bash run_all.sh)"),
    "status": ("pneumoseg.stages.status:main", "where a config's pipeline stands: each stage, its figures, reports"),
    "leaderboard": ("pneumoseg.evaluation.leaderboard:cli", "rank every experiment under the output folder"),
    "validate": ("pneumoseg.evaluation.validate:main", "check a submission file against the test set"),
    "serve": ("pneumoseg.serve.server:main", "serve a model package over HTTP (SageMaker's container contract)"),
    "predict": ("pneumoseg.inference.folder:main", "predict a folder of DICOM or PNG images with a model"),
}
RUN_ALL = Path(__file__).resolve().parents[2] / "run_all.sh"


def usage() -> str:
    """The command's help: its subcommands and what each does."""
    width = max(map(len, COMMANDS))
    lines = ["usage: pneumoseg COMMAND [ARGS ...]   (pneumoseg COMMAND --help for its own arguments)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def load(name: str) -> Callable[[list[str]], int]:
    """The function of subcommand ``name``.

    Raises:
        SystemExit: (with a message, exit code 2) an unknown subcommand, or one whose module this installation
            lacks.
    """
    if name not in COMMANDS:
        sys.exit(f"pneumoseg: unknown command {name!r}\n\n{usage()}")
    target = COMMANDS[name][0]
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # a dependency of the module is missing: a broken installation, whose traceback helps
        print(
            f"pneumoseg {name}: this installation has no {module_name} (the command's module); update pneumoseg "
            f"or reinstall it (pip install -e .)",
            file=sys.stderr,
        )
        sys.exit(2)
    return getattr(module, function)


def run_pipeline(argv: Sequence[str]) -> int:
    """``pneumoseg run ...``: ``run_all.sh`` with the same arguments (see its header), from the project's checkout.

    Args:
        argv: run_all.sh's arguments: ``[CONFIG] [--from NN] [--to NN] [--force] [key=value ...]``.

    Returns:
        run_all.sh's exit code (130 when interrupted).
    """
    if not RUN_ALL.is_file():
        print(
            f"pneumoseg run: {RUN_ALL} not found; this command runs the pipeline of a project checkout installed "
            f"with pip install -e . (run the stage scripts of the checkout instead)",
            file=sys.stderr,
        )
        return 2
    # run_all.sh runs from the project root; a config given relative to the folder the command runs in stays valid.
    arguments = [
        str(Path(item).resolve()) if item.endswith((".yaml", ".yml")) and Path(item).is_file() else item
        for item in argv
    ]
    try:
        return subprocess.run(["bash", str(RUN_ALL), *arguments], env=os.environ.copy()).returncode
    except KeyboardInterrupt:  # the stage has said where it stopped; run_all.sh passes its 130 on
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``pneumoseg COMMAND [ARGS ...]``: run one subcommand; its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command = load(argv[0])
    sys.argv = [f"pneumoseg {argv[0]}", *argv[1:]]  # argparse's usage lines name the subcommand
    return int(command(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
