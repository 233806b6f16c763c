"""Stage 03: train a model per cross-validation fold (--fold K|all, --resume) and predict its held-out images."""

from pneumoseg.cli import main
from pneumoseg.stages import train

if __name__ == "__main__":
    main(__doc__, train.stage, train.parser, number="03")
