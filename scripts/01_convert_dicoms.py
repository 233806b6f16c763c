"""Stage 01: convert every DICOM under paths.input_dir to PNGs at each of prepare.sizes, with metadata.csv.

Outputs go to ${paths.prepared_dir}/01_convert/ (see pneumoseg.stages.convert).
"""

from pneumoseg.cli import main
from pneumoseg.stages import convert

if __name__ == "__main__":
    main(__doc__, convert.stage, number="01")
