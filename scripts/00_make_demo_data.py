"""Stage 00: write the synthetic demo dataset (the config's `demo` section) into paths.input_dir.

The files have the real challenge's form, so the later stages run on them unchanged; a config without a
`demo` section (real data) makes this stage do nothing (see pneumoseg.stages.demo_data).
"""

from pneumoseg.cli import main
from pneumoseg.stages import demo_data

if __name__ == "__main__":
    main(__doc__, demo_data.stage, number="00")
