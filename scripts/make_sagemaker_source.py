"""The code-only source bundle of a SageMaker training job (the SDK's source_dir): the package, scripts/, configs/
and a requirements.txt for the PyTorch training container. See pneumoseg.sagemaker.bundle."""

import argparse
import logging
import sys
from pathlib import Path

from pneumoseg.errors import PneumosegError
from pneumoseg.logs import setup_logging
from pneumoseg.sagemaker.bundle import write_bundle

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(ROOT), help="the pneumoseg checkout (default: %(default)s)")
    parser.add_argument(
        "--out",
        default=str(ROOT / "output" / "sagemaker" / "source"),
        help="the bundle folder, replaced if it holds an older bundle (default: %(default)s)",
    )
    args = parser.parse_args()
    setup_logging()
    try:
        write_bundle(args.root, args.out)
    except PneumosegError as exc:
        logging.error("%s", exc)
        sys.exit(1)
