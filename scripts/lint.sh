#!/usr/bin/env bash
# The static checks CI runs before the tests (and .pre-commit-config.yaml before a commit): ruff's lint rules,
# ruff's format check and mypy on src/, all configured in pyproject.toml.
#
#   bash scripts/lint.sh [PATH ...]     (default: src scripts benchmarks tests)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
PATHS=("$@")
[ ${#PATHS[@]} -gt 0 ] || PATHS=(src scripts benchmarks tests)

status=0
echo "=== ruff check" && "$PY" -m ruff check "${PATHS[@]}" || status=1
echo "=== ruff format --check" && "$PY" -m ruff format --check "${PATHS[@]}" || status=1
echo "=== mypy (src/)" && "$PY" -m mypy || status=1
exit $status
