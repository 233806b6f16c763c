"""Stage 04: choose the post-processing that maximises the out-of-fold dice; write thresholds.json, the OOF report."""

from pneumoseg.cli import main
from pneumoseg.stages import search

if __name__ == "__main__":
    main(__doc__, search.stage, number="04")
