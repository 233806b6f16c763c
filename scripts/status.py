"""Show where the pipeline of a config stands: each stage done or not, its headline figures and its reports."""
import sys

from pneumoseg.stages import status

if __name__ == "__main__":
    sys.exit(status.main())
