"""Show where the pipeline of a config stands: each stage done or not, its headline figures and its reports."""

from pneumoseg.cli import main
from pneumoseg.stages import status

if __name__ == "__main__":
    main(__doc__, status.stage)
