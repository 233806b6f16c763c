"""Stage 02: masks at every prepared size, cross-validation folds, the test list and a data report, from the labels."""

from pneumoseg.cli import main
from pneumoseg.stages import prepare_labels

if __name__ == "__main__":
    main(__doc__, prepare_labels.stage, number="02")
