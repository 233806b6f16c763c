#!/usr/bin/env bash
# Runs the pipeline's numbered stages in order on one config.
#
#   bash run_all.sh [CONFIG] [--from NN] [--to NN] [--force] [key=value ...]
#
# CONFIG defaults to configs/demo.yaml. On an ensemble config, stage "03" runs stages 00-03 of every member not
# trained yet (scripts/train_members.py), then 04-06 run on the ensemble. A stage whose outputs are complete for the
# same resolved config is skipped (--force redoes it); a stage that fails stops the run; rerunning continues where
# it stopped.
set -euo pipefail
cd "$(dirname "$0")"

CONFIG=configs/demo.yaml
FROM=00
TO=99
FORCE=()
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="$2"; shift 2 ;;
    --to) TO="$2"; shift 2 ;;
    --force) FORCE=(--force); shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *.yaml|*.yml) CONFIG="$1"; shift ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -f "$CONFIG" ] || { echo "run_all.sh: config not found: $CONFIG" >&2; exit 2; }

source scripts/setup_env.sh

# The stages this config runs, in order, as "NN script" lines (the stage table, pneumoseg.stage_table; on an
# ensemble config stage 03 is scripts/train_members.py). A stage whose script does not exist yet is reported as
# still to come.
STAGE_LIST=$("$PY" -m pneumoseg.stage_table "$CONFIG")
mapfile -t STAGES <<< "$STAGE_LIST"

started=$SECONDS
todo=()
for entry in "${STAGES[@]}"; do
  num="${entry%% *}"; script="${entry#* }"
  if [ "$((10#$num))" -lt "$((10#$FROM))" ] || [ "$((10#$num))" -gt "$((10#$TO))" ]; then continue; fi
  if [ ! -f "$script" ]; then todo+=("$num"); continue; fi
  echo "=== stage $num: $script"
  stage_start=$SECONDS
  if ! "$PY" "$script" --config "$CONFIG" "${FORCE[@]}" "${OVERRIDES[@]}"; then
    echo "=== stage $num ($script) failed; fix the error above and rerun the same command to continue." >&2
    exit 1
  fi
  echo "=== stage $num finished in $((SECONDS - stage_start)) s"
done

echo "=== all stages done in $((SECONDS - started)) s (config: $CONFIG)"
if [ ${#todo[@]} -gt 0 ]; then
  echo "=== not yet implemented in this version: stage(s) ${todo[*]}"
fi
"$PY" scripts/status.py --config "$CONFIG" "${OVERRIDES[@]}" || true
