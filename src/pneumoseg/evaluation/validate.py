"""``pneumoseg validate`` (and ``scripts/validate_submission.py``): check a submission file against a sample
submission (``--sample``) or an experiment's test set (``--config``); print every problem, exit 1 if there is any."""

from __future__ import annotations

import argparse
import logging

from pneumoseg.config import load_config
from pneumoseg.data.rle import FORMATS
from pneumoseg.errors import PneumosegError
from pneumoseg.evaluation.submission import check_submission
from pneumoseg.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), check the submission, print the verdict; the exit code."""
    parser = argparse.ArgumentParser(
        description="Check a submission file: header, one row per test image, every "
        "run-length string decoding within its image."
    )
    parser.add_argument("submission", help="the submission CSV to check")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sample", help="a sample submission: its ImageIds and order are expected")
    source.add_argument("--config", help="an experiment config: its test set (stages 01-02 done) is expected")
    parser.add_argument(
        "--fmt",
        choices=FORMATS,
        default=None,
        help="run-length form (default: predict.fmt with --config, else relative)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides) if args.config else None
        valid, text = check_submission(args.submission, args.sample, cfg, args.fmt)
    except PneumosegError as exc:
        logging.getLogger("validate_submission").error("%s", exc)
        return 1
    print(text)
    return 0 if valid else 1
