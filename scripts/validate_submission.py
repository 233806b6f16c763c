"""Check a submission file against a sample submission (--sample) or an experiment's test set (--config); print
every problem, exit 1 if there is any."""

import sys

from pneumoseg.evaluation.validate import main

if __name__ == "__main__":
    sys.exit(main())
