#!/usr/bin/env bash
# Runs the test suite. Sets up the environment first if needed (see scripts/setup_env.sh).
# Extra arguments go to pytest, e.g. `bash run_tests.sh -k rle -x`.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1   # tests never download weights; fail fast instead of retrying
exec "$PY" -m pytest "$@"
