#!/usr/bin/env bash
# The GPU check: every CUDA path of the project once, in under 8 minutes on one GPU, ending with one table.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--workdir DIR]
#
#   1. benchmarks/bench_train_step.py at 512 px, UNet-ResNet34: fp16 with a GradScaler, bf16, and fp16 without
#      channels_last (images/s and peak GPU memory of each);
#   2. the demo through stages 00-05 at 256 px, 2 epochs a fold, trained and predicting on the GPU;
#   3. torchrun with nccl, one process per visible GPU, one epoch of fold 0;
#   4. the same checkpoint's probabilities on the GPU and on the CPU: max difference <= 1e-3 (fp32, TF32 off),
#      and the difference under AMP for information.
#
# --dry-run runs the same steps on the CPU at toy sizes (configs/tiny.yaml, 64 px, torchrun with gloo and 2
# processes): a check of this script's plumbing in a few minutes, not a GPU figure. Outputs go to DIR
# (default: a fresh temporary folder); logs of every step to DIR/logs. Exits 1 when a step fails or the
# agreement check does.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
set +e                                   # setup_env.sh sets -e; a failed step must reach the table, not end us

DRY=0
WORK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --workdir) WORK="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--workdir DIR]" >&2; exit 2 ;;
  esac
done
WORK="${WORK:-$(mktemp -d /tmp/pneumoseg_gpu_check.XXXXXX)}"
mkdir -p "$WORK/logs"
TABLE="$WORK/table.tsv"
printf 'step\tfigure\tvalue\n' > "$TABLE"
FAILED=0

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; DEMO_CONFIG=configs/tiny.yaml; DEMO_SIZE=64; BENCH_SIZE=64; BENCH_IMAGES=32
  BENCH_CONFIG=(--config configs/tiny.yaml); NPROC=2
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  DEVICE=cuda; DEMO_CONFIG=configs/demo.yaml; DEMO_SIZE=256; BENCH_SIZE=512; BENCH_IMAGES=512
  BENCH_CONFIG=(); NPROC="$($PY -c 'import torch; print(torch.cuda.device_count())')"
  if [[ "$NPROC" -lt 1 ]]; then echo "no CUDA device visible: use --dry-run on a CPU machine" >&2; exit 1; fi
fi
WORKERS="$(( $(nproc) > 12 ? 12 : $(nproc) ))"
PATHS=("paths.input_dir=$WORK/input" "paths.output_root=$WORK/output")

row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$TABLE"; }

step() {  # step NAME LOGFILE COMMAND...: run, record its wall time or its failure
  local name="$1" logfile="$WORK/logs/$2" start=$SECONDS
  shift 2
  echo "--- $name: $*"
  if "$@" > "$logfile" 2>&1; then
    row "$name" "wall s" "$(( SECONDS - start ))"
  else
    row "$name" "FAILED" "see $logfile"; FAILED=1; tail -n 20 "$logfile"
  fi
}

# 1. The training step at 512 px: the three precision / memory-format variants.
for variant in "fp16 true" "bf16 true" "fp16 false"; do
  read -r amp channels_last <<< "$variant"
  name="train step $amp channels_last=$channels_last"
  log="train_step_${amp}_${channels_last}.log"
  step "$name" "$log" $PY benchmarks/bench_train_step.py --device "$DEVICE" "${BENCH_CONFIG[@]}" \
       --images "$BENCH_IMAGES" train.amp="$amp" train.channels_last="$channels_last" \
       data.image_size="$BENCH_SIZE" train.num_workers="$WORKERS"
  rate="$(grep -oP 'memory: .* \K[0-9.]+(?= images/s)' "$WORK/logs/$log")"
  loader="$(grep -oP 'loader: .* \K[0-9.]+(?= images/s)' "$WORK/logs/$log")"
  row "$name" "images/s (batches in memory)" "${rate:-n/a}"
  row "$name" "images/s (real loader, $WORKERS workers)" "${loader:-n/a}"
  row "$name" "peak GPU memory GiB" "$(grep -oP 'peak GPU memory: \K[0-9.]+' "$WORK/logs/$log" || echo n/a)"
done

# 2. The demo, stages 00-05, at DEMO_SIZE px, 2 epochs a fold on the device.
DEMO=("${PATHS[@]}" data.image_size="$DEMO_SIZE" train.epochs=2 train.device="$DEVICE" predict.device="$DEVICE"
      train.num_workers="$WORKERS" predict.num_workers="$WORKERS")
step "demo 00-05" demo.log bash run_all.sh "$DEMO_CONFIG" --to 05 "${DEMO[@]}"
$PY - "$DEMO_CONFIG" "${DEMO[@]}" >> "$TABLE" 2>> "$WORK/logs/demo.log" <<'PY'
import json, sys
from pneumoseg import layout
from pneumoseg.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
train = json.loads((layout.train_dir(cfg) / "done.json").read_text())
predict = json.loads((layout.predict_dir(cfg) / "done.json").read_text())["summary"]
oof = json.loads(layout.oof_report_path(cfg).read_text())
print(f"demo 00-05\tstage 03 s\t{train.get('seconds', 'n/a')}")
print(f"demo 00-05\tOOF score\t{oof['oof_score']:.4f}")
print(f"demo 00-05\ttest score\t{predict.get('test_score', 'n/a')}")
print(f"demo 00-05\tstage 05 s/image on {predict['device']}\t{predict['seconds_per_image']}")
PY

# 3. torchrun: one process per GPU (nccl; gloo in the dry run), one epoch of fold 0, its own experiment folder.
step "torchrun x$NPROC" torchrun.log $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
     scripts/03_train.py --config "$DEMO_CONFIG" --fold 0 --force "${DEMO[@]}" experiment=gpu_check_ddp \
     train.epochs=1
row "torchrun x$NPROC" "backend" "$([[ $DEVICE == cuda ]] && echo nccl || echo gloo)"

# 4. The same checkpoint on the device and on the CPU.
$PY - "$DEVICE" "$DEMO_CONFIG" "${DEMO[@]}" >> "$TABLE" 2> "$WORK/logs/agreement.log" <<'PY'
import sys
import cv2
import numpy as np
import pandas as pd
import torch
from pneumoseg import layout
from pneumoseg.config import load_config
from pneumoseg.inference.predictor import Predictor
from pneumoseg.inference.tta import predict_probs

device, cfg = sys.argv[1], load_config(sys.argv[2], sys.argv[3:])
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
on_cpu, on_device = Predictor.from_experiment(cfg, "cpu"), Predictor.from_experiment(cfg, device)
ids = pd.read_csv(layout.test_images_path(cfg), dtype={"ImageId": str}).ImageId[:32]
folder = layout.images_dir(cfg, on_cpu.image_size)
images = np.stack([cv2.imread(str(folder / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in ids])
reference = predict_probs(on_cpu.models, images, on_cpu.tta, amp=None)
fp32 = np.abs(predict_probs(on_device.models, images, on_device.tta, amp=None) - reference).max()
amp = np.abs(predict_probs(on_device.models, images, on_device.tta, amp="auto") - reference).max()
print(f"agreement\tmax |p_{device} - p_cpu| fp32 ({len(ids)} images)\t{fp32:.2e}")
print(f"agreement\tmax |p_{device} - p_cpu| AMP (information)\t{amp:.2e}")
print(f"agreement\tfp32 within 1e-3\t{'PASS' if fp32 <= 1e-3 else 'FAIL'}")
sys.exit(0 if fp32 <= 1e-3 else 1)
PY
[[ $? == 0 ]] || { row agreement FAILED "see $WORK/logs/agreement.log"; FAILED=1; }

echo
echo "GPU check$([[ $DRY == 1 ]] && echo ' (DRY RUN on the CPU: plumbing only, no GPU figure)') in $WORK:"
column -t -s $'\t' "$TABLE"
exit $FAILED
