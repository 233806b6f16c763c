"""Stages 00-03 of each member of an ensemble config, skipping what is complete (see pneumoseg.stages.ensemble).

run_all.sh runs this instead of stages 00-03 on an ensemble config; key=value overrides apply to the ensemble's own
config, a member's to its `ensemble.members[*].overrides`.
"""

from pneumoseg.cli import main
from pneumoseg.stages import ensemble

if __name__ == "__main__":
    main(__doc__, ensemble.train_stage)
