"""What every numbered script shares: ``--config``, ``key=value`` overrides, ``--force`` (and the true/false words
on/off options take), logging, the stage's running and failed markers (:mod:`pneumoseg.stage_table`), and turning
user-fixable errors into one clear line and a non-zero exit code.

Every numbered script has one shape (a stage with options of its own adds its parser: ``main(__doc__, train.stage,
train.parser, number="03")``)::

    from pneumoseg.cli import main
    from pneumoseg.stages import convert

    if __name__ == "__main__":
        main(__doc__, convert.stage, number="01")

A parser can also report a failure elsewhere (:meth:`StageParser.report_failure`): stage 03's parser writes it as a
SageMaker job's failure reason (:class:`pneumoseg.sagemaker.arguments.JobParser`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from pneumoseg import logs, stage_table
from pneumoseg.config import DEFAULT_CONFIG, load_config
from pneumoseg.errors import ConfigError, PneumosegError
from pneumoseg.logs import setup_logging

log = logging.getLogger("pneumoseg")


# The words an on/off option or hyperparameter takes, in any case: the one vocabulary of the command lines.
TRUE_WORDS = ("true", "1", "yes", "y")
FALSE_WORDS = ("false", "0", "no", "n")


def read_flag(value: str, name: str) -> bool:
    """True or False for one of :data:`TRUE_WORDS` or :data:`FALSE_WORDS` (any case).

    Args:
        value: the word given.
        name: the option it was given to, for the message.

    Raises:
        ConfigError: any other word.
    """
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} takes true or false, not {value!r}")


def switch_arguments(argv: Sequence[str], switches: set[str]) -> list[str]:
    """Read an explicit value after an on/off switch, as SageMaker passes a boolean hyperparameter
    (``--force True``): ``--force true`` and ``--force=True`` become ``--force``; ``--force false`` and
    ``--force=False`` are dropped. A switch followed by anything else (an override) is left as it is.

    Args:
        argv: the command-line arguments.
        switches: the option strings of the parser's on/off switches (``store_true`` actions).
    """
    result: list[str] = []
    tokens, i = list(argv), 0
    while i < len(tokens):
        name, equals, value = tokens[i].partition("=")
        has_value = bool(equals)
        if (
            name in switches
            and not has_value
            and i + 1 < len(tokens)
            and tokens[i + 1].lower() in TRUE_WORDS + FALSE_WORDS
        ):
            has_value, value = True, tokens[i + 1]
            i += 1
        if name in switches and has_value:
            result += [name] if read_flag(value, name) else []
        else:
            result.append(tokens[i])
        i += 1
    return result


class StageParser(argparse.ArgumentParser):
    """An argument parser whose on/off switches also take ``true``/``false`` (see :func:`switch_arguments`), and
    which reports every failure of its script, usage errors included, through :meth:`report_failure`."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        # argparse has no public list of a parser's actions; _actions holds them, parents' included.
        switches = {
            option
            for action in self._actions
            if isinstance(action, argparse._StoreTrueAction)
            for option in action.option_strings
        }
        try:
            argv = switch_arguments(argv, switches)
        except ConfigError as exc:
            self.error(str(exc))
        return super().parse_known_args(argv, namespace)

    def error(self, message):
        self.report_failure(ConfigError(f"{self.prog}: {message} (see --help)"))
        super().error(message)

    def report_failure(self, exc: BaseException) -> None:
        """Report a failure beyond the log line (nothing here; a subclass may write it where a runner reads it).

        Args:
            exc: the error, a usage error as a ConfigError.
        """


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser (:class:`StageParser`) with the options every stage script takes."""
    parser = StageParser(description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)")
    parser.add_argument(
        "--force", action="store_true", help="redo the stage even if its outputs are complete (also --force true|false)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys, e.g. train.epochs=3"
    )
    return parser


ParserFactory = Callable[[str], argparse.ArgumentParser]


def run_stage_script(
    description: str,
    stage: Callable[..., object],
    make_parser: ParserFactory = stage_parser,
    argv: list[str] | None = None,
    number: str | None = None,
) -> int:
    """Parse arguments, load the config, call ``stage(cfg, args)`` and return the process exit code.

    Args:
        description: the script's docstring (its first line is the ``--help`` description).
        stage: ``stage(cfg, args)``, the stage module's entry.
        make_parser: builds the script's parser from the description (default :func:`stage_parser`; a stage with
            options of its own has a ``parser`` function).
        argv: the arguments (default the command line).
        number: the stage the script runs (a row of :mod:`pneumoseg.stage_table`): while it runs, its folder
            holds a running marker, and when it raises, ``failed.json`` with the error's line, for
            ``scripts/status.py``. None for scripts that are no stage of their own.

    Returns 0 on success, 1 when the stage raises a PneumosegError (printed as one line: what is wrong
    and how to fix it, and given to the parser's :meth:`StageParser.report_failure`), 130 on Ctrl-C. Any
    other exception is a bug and keeps its traceback (which SageMaker's toolkit reports itself).
    """
    parser = make_parser(description.strip().splitlines()[0])
    args = parser.parse_args(argv)
    setup_logging()
    logs.clear()
    try:
        cfg: DictConfig = load_config(args.config, args.overrides)
        tracked: contextlib.AbstractContextManager = contextlib.nullcontext()
        if number is not None:
            row = stage_table.stage(number)
            tracked = stage_table.tracking(row.folder(cfg), make=bool(row.folder_name))
        with tracked:
            stage(cfg, args)
    except PneumosegError as exc:
        log.error("%s", exc)
        if isinstance(parser, StageParser):
            parser.report_failure(exc)
        return 1
    except KeyboardInterrupt:
        log.error("%s", logs.interrupted_message())
        logs.clear()
        return 130
    return 0


def main(
    description: str, stage: Callable[..., object], make_parser: ParserFactory = stage_parser, number: str | None = None
) -> None:
    """Run a numbered script (see :func:`run_stage_script`, same arguments) and exit with its code."""
    sys.exit(run_stage_script(description, stage, make_parser, number=number))
