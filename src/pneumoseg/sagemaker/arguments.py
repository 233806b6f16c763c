"""A SageMaker training job's command line: its hyperparameters (``--key value``) read as config overrides, its
path variables added as overrides, and every failure written as the job's failure reason
(:func:`pneumoseg.sagemaker.job.report_failure`). Stage 03's parser is a :class:`JobParser`."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from pneumoseg.cli import StageParser
from pneumoseg.errors import ConfigError
from pneumoseg.sagemaker.job import job_overrides, report_failure


def sagemaker_arguments(
    argv: Sequence[str], known_options: set[str], environ: Mapping[str, str] | None = None
) -> list[str]:
    """Rewrite SageMaker-style ``--key value`` (or ``--key=value``) hyperparameters whose key is not an option of
    the script into ``key=value`` overrides, and add the overrides of SageMaker's path variables.

    Args:
        argv: the command-line arguments.
        known_options: the option strings the parser defines (``--config``, ``--fold``, ...).
        environ: the environment (default ``os.environ``); inside a SageMaker job (``SM_MODEL_DIR`` set), its
            paths (:func:`pneumoseg.sagemaker.job.job_overrides`).

    Returns:
        ``argv`` with the hyperparameters moved to the end as overrides, then the path overrides.
    """
    kept, overrides = [], []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, has_value, value = token.partition("=")
        if token.startswith("--") and name not in known_options:
            if not has_value:
                if i + 1 >= len(tokens):
                    raise ConfigError(f"hyperparameter {token} has no value")
                value = tokens[i + 1]
                i += 1
            overrides.append(f"{name[2:]}={value}")
        else:
            kept.append(token)
        i += 1
    return kept + overrides + job_overrides(environ)


class JobParser(StageParser):
    """A stage parser that also accepts SageMaker's ``--key value`` hyperparameters (see
    :func:`sagemaker_arguments`) and overrides before and after options (``a=1 --fold 0 b=2``), and that writes
    every failure of its script as the job's failure reason (nothing outside a job)."""

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return self.parse_intermixed_args(sagemaker_arguments(argv, set(self._option_string_actions)), namespace)

    def report_failure(self, exc: BaseException) -> None:
        report_failure(exc)
