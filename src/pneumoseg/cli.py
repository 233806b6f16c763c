"""What every numbered script shares: ``--config``, ``key=value`` overrides, ``--force``, logging, and
turning user-fixable errors into one clear line and a non-zero exit code (inside a SageMaker training job, also
the job's failure reason: :func:`pneumoseg.sagemaker.job.report_failure`)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from omegaconf import DictConfig

from pneumoseg import interrupts
from pneumoseg.config import DEFAULT_CONFIG, load_config
from pneumoseg.errors import ConfigError, PneumosegError
from pneumoseg.sagemaker.job import report_failure

log = logging.getLogger("pneumoseg")


TRUE_WORDS = ("true", "1", "yes", "y")
FALSE_WORDS = ("false", "0", "no", "n")


def switch_arguments(argv: Sequence[str], switches: set[str]) -> list[str]:
    """Read an explicit value after an on/off switch, as SageMaker passes a boolean hyperparameter
    (``--force True``): ``--force true`` and ``--force=True`` become ``--force``; ``--force false`` and
    ``--force=False`` are dropped. A switch followed by anything else (an override) is left as it is.

    Args:
        argv: the command-line arguments.
        switches: the option strings of the parser's on/off switches (``store_true`` actions).
    """
    result, tokens, i = [], list(argv), 0
    while i < len(tokens):
        name, has_value, value = tokens[i].partition("=")
        if name in switches and not has_value and i + 1 < len(tokens) \
                and tokens[i + 1].lower() in TRUE_WORDS + FALSE_WORDS:
            has_value, value = True, tokens[i + 1]
            i += 1
        if name in switches and has_value:
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ConfigError(f"{name} takes true or false, not {value!r}")
            result += [name] if value.lower() in TRUE_WORDS else []
        else:
            result.append(tokens[i])
        i += 1
    return result


class StageParser(argparse.ArgumentParser):
    """An argument parser whose on/off switches also take ``true``/``false`` (see :func:`switch_arguments`), and
    whose usage errors become a SageMaker job's failure reason too."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        # argparse has no public list of a parser's actions; _actions holds them, parents' included.
        switches = {option for action in self._actions if isinstance(action, argparse._StoreTrueAction)
                    for option in action.option_strings}
        try:
            argv = switch_arguments(argv, switches)
        except ConfigError as exc:
            self.error(str(exc))
        return super().parse_known_args(argv, namespace)

    def error(self, message):
        report_failure(ConfigError(f"{self.prog}: {message} (see --help)"))
        super().error(message)


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser (:class:`StageParser`) with the options every stage script takes."""
    parser = StageParser(description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="redo the stage even if its outputs are complete (also --force true|false)")
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
    and how to fix it; inside a SageMaker job also written as the job's failure reason), 130 on Ctrl-C. Any
    other exception is a bug and keeps its traceback (which SageMaker's toolkit reports itself).
    """
    parser = parser or stage_parser(description)
    args = parser.parse_args(argv)
    setup_logging()
    interrupts.clear()
    try:
        cfg: DictConfig = load_config(args.config, args.overrides)
        stage(cfg, args)
    except PneumosegError as exc:
        log.error("%s", exc)
        report_failure(exc)
        return 1
    except KeyboardInterrupt:
        log.error("%s", interrupts.interrupted_message())
        interrupts.clear()
        return 130
    return 0


def main(description: str, stage: Callable[..., object], parser: argparse.ArgumentParser | None = None) -> None:
    sys.exit(run_stage_script(description, stage, parser))
