"""Write the leaderboard of every experiment under the output folder (output/leaderboard.md and .png), best first
by the nested estimate; print the table."""

import sys

from pneumoseg.evaluation.leaderboard import cli

if __name__ == "__main__":
    sys.exit(cli())
