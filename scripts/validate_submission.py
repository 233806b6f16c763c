"""Check a submission file against a sample submission (--sample) or an experiment's test set (--config); print
every problem, exit 1 if there is any."""
import sys

from pneumoseg.stages.predict import validate_cli

if __name__ == "__main__":
    sys.exit(validate_cli())
