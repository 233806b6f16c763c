# Sourced by run_all.sh and run_tests.sh: chooses the Python to run with and sets it up if needed.
# Sets PY. Uses the current python3 when it already has every pinned package of requirements.txt and
# requirements-test.txt (the check tools); otherwise creates .venv (once; again only when one of them or
# pyproject.toml changes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NO_ALBUMENTATIONS_UPDATE=1        # albumentations otherwise calls PyPI on import
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

_base_python() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  echo "error: no python3 found; install Python 3.11" >&2
  return 1
}

_has_requirements() {  # $1: a python; succeeds when every pin of the requirement files is installed in it
  "$1" - "${REQUIREMENT_FILES[@]}" <<'PYCHECK' 2>/dev/null
import re, sys
from importlib.metadata import version, PackageNotFoundError
for line in (line for name in sys.argv[1:] for line in open(name)):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, pin = re.split(r"==", line)
    try:
        if version(name).split("+")[0] != pin:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYCHECK
}

REQUIREMENT_FILES=("$ROOT/requirements.txt")
[ -f "$ROOT/requirements-test.txt" ] && REQUIREMENT_FILES+=("$ROOT/requirements-test.txt")

_stamp() { cat "${REQUIREMENT_FILES[@]}" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16; }

if [ -x "$ROOT/.venv/bin/python" ] && [ "$(cat "$ROOT/.venv/.installed" 2>/dev/null)" = "$(_stamp)" ]; then
  PY="$ROOT/.venv/bin/python"
elif BASE="$(_base_python)" && _has_requirements "$BASE"; then
  PY="$BASE"
else
  echo "setting up .venv from requirements.txt (a few minutes, once)..." >&2
  BASE="$(_base_python)"
  [ -x "$ROOT/.venv/bin/python" ] || "$BASE" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$ROOT/.venv/bin/python" -m pip install --quiet "${REQUIREMENT_FILES[@]/#/-r}"
  "$ROOT/.venv/bin/python" -m pip install --quiet --no-deps -e "$ROOT" >/dev/null
  _stamp > "$ROOT/.venv/.installed"
  PY="$ROOT/.venv/bin/python"
fi
export PY
