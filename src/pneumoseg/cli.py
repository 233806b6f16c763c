"""What every numbered script shares: ``--config``, ``key=value`` overrides, ``--force``, logging, and
turning user-fixable errors into one clear line and a non-zero exit code."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from omegaconf import DictConfig

from pneumoseg.config import DEFAULT_CONFIG, load_config
from pneumoseg.errors import PneumosegError

log = logging.getLogger("pneumoseg")


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo the stage even if its outputs are complete")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.epochs=3")
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_stage_script(description: str, stage: Callable[..., object],
                     parser: argparse.ArgumentParser | None = None,
                     argv: list[str] | None = None) -> int:
    """Parse arguments, load the config, call ``stage(cfg, args)`` and return the process exit code.

    Returns 0 on success, 1 when the stage raises a PneumosegError (printed as one line: what is wrong
    and how to fix it), 130 on Ctrl-C. Any other exception is a bug and keeps its traceback.
    """
    parser = parser or stage_parser(description)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg: DictConfig = load_config(args.config, args.overrides)
        stage(cfg, args)
    except PneumosegError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to continue where it stopped")
        return 130
    return 0


def main(description: str, stage: Callable[..., object], parser: argparse.ArgumentParser | None = None) -> None:
    sys.exit(run_stage_script(description, stage, parser))
