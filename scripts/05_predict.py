"""Stage 05: predict every test image with the fold ensemble (TTA, chosen post-processing) and write submission.csv."""

from pneumoseg.cli import main
from pneumoseg.stages import predict

if __name__ == "__main__":
    main(__doc__, predict.stage, number="05")
