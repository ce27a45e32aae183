#!/usr/bin/env bash
# One unattended run on a machine with one GPU and no network, in at most about 10 minutes (issue 19):
#   1. U-Net training throughput (img/s) of the tiny and cifar presets: fp32, bf16 autocast, channels_last,
#      bf16 + channels_last (benchmarks/unet_throughput.py; against diffusers' twin where diffusers is installed);
#   2. a fixed-budget training of the course's recipe (flow prediction, straight schedule, tiny preset, class-
#      conditional Fashion-MNIST; python -m minidiff.train) with a wall-clock guard, then its export (weights + card);
#   3. classifier-FID, class accuracy, precision/recall of the exported model (benchmarks/flow_vs_diffusion.py,
#      rows also stored in the model card) and its last sample grid;
#   4. throughput under torch.compile, last (compiling is the slowest, least predictable part), in the time left.
#
# Usage:
#   bash benchmarks/gpu_run.sh [--out DIR] [--data DIR]
#     --out DIR    results folder (default: $GPU_RUN_OUT or gpu_results/)
#     --data DIR   folder holding Fashion-MNIST's IDX files (default: $GPU_RUN_DATA, else minidiff's own search:
#                  $MINIDIFF_DATA, ~/.cache/minidiff/data, /usr/share/datasets/fashion-mnist; see
#                  minidiff/data/datasets.py). Nothing is downloaded.
#   GPU_RUN_SMOKE=1 bash benchmarks/gpu_run.sh --out /tmp/smoke     # CPU smoke run: every budget shrunk
#
# Budgets (environment variables, GPU defaults; GPU_RUN_SMOKE=1 sets the small ones):
#   GPU_RUN_SECONDS (570: the whole run; the compile section gets what is left)  GPU_RUN_DEVICE (cuda)
#   GPU_RUN_PRESETS ("tiny cifar")  GPU_RUN_SETUPS ("fp32 bf16 channels_last bf16_channels_last")
#   GPU_RUN_COMPILE_SETUPS ("compile bf16_channels_last_compile")
#   GPU_RUN_TRAIN_STEPS (8000)  GPU_RUN_TRAIN_SECONDS (240: training stops there and the last checkpoint is used)
#   GPU_RUN_N (1000 samples per evaluation)  GPU_RUN_NFE ("10 20")  GPU_RUN_THREADS (torch CPU threads)
#   PYTHON (python3)
#
# Writes, under OUT: env.txt, timings.txt, throughput.jsonl + throughput.log, train.log, run/ (checkpoint,
# config, samples/), model.safetensors + model.json (card), results/ (quality.json, quality.txt, samples.png).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${GPU_RUN_OUT:-gpu_results}"
DATA="${GPU_RUN_DATA:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    *) echo "gpu_run.sh: unknown argument '$1' (known: --out DIR, --data DIR)" >&2; exit 2 ;;
  esac
done

if [[ "${GPU_RUN_SMOKE:-0}" == "1" ]]; then  # a CPU run of every step with tiny workloads (no compile: minutes on CPU)
  export MINIDIFF_SMOKE=1
  : "${GPU_RUN_DEVICE:=cpu}" "${GPU_RUN_PRESETS:=tiny}" "${GPU_RUN_SETUPS:=fp32 channels_last}"
  : "${GPU_RUN_COMPILE_SETUPS:=}" "${GPU_RUN_TRAIN_STEPS:=4}" "${GPU_RUN_N:=20}" "${GPU_RUN_NFE:=2}"
  THROUGHPUT_ARGS=(--batch 2 --steps 1 --rounds 1 --warmup 1)
  TRAIN_ARGS=(--batch-size 8 --sample-steps 2 --ckpt-every 2)
else
  THROUGHPUT_ARGS=(--steps 20 --rounds 5 --warmup 3)
  TRAIN_ARGS=(--batch-size 64 --ckpt-every 500 --sample-every 2000)  # the card's batch; a checkpoint for the guard
fi
DEVICE="${GPU_RUN_DEVICE:-cuda}"
PRESETS_LIST="${GPU_RUN_PRESETS:-tiny cifar}"
SETUPS="${GPU_RUN_SETUPS:-fp32 bf16 channels_last bf16_channels_last}"
COMPILE_SETUPS="${GPU_RUN_COMPILE_SETUPS-compile bf16_channels_last_compile}"  # set but empty: no compile section
TOTAL_SECONDS="${GPU_RUN_SECONDS:-570}"
TRAIN_STEPS="${GPU_RUN_TRAIN_STEPS:-8000}"
TRAIN_SECONDS="${GPU_RUN_TRAIN_SECONDS:-240}"
N="${GPU_RUN_N:-1000}"
NFE="${GPU_RUN_NFE:-10 20}"
PY="${PYTHON:-python3}"
THREADS=()
if [[ -n "${GPU_RUN_THREADS:-}" ]]; then THREADS=(--threads "$GPU_RUN_THREADS"); fi

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -n "$DATA" ]]; then export MINIDIFF_DATA="$DATA"; fi  # minidiff.data.datasets.default_root reads it
mkdir -p "$OUT/results"
OUT="$(cd "$OUT" && pwd)"
: >"$OUT/timings.txt"
START=$SECONDS
mark() { echo "[$(date +%T), +$((SECONDS - START)) s] $*" | tee -a "$OUT/timings.txt"; }

# ---------------------------------------------------------------- 0. the machine, the device and the data
mark "environment and data"
{ command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"; } >"$OUT/env.txt" 2>&1
"$PY" - "$DEVICE" <<'EOF' | tee -a "$OUT/env.txt"
import sys, torch
from minidiff.data.datasets import load_dataset
device = torch.device(sys.argv[1])
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {device}, "
      f"CPU threads {torch.get_num_threads()}")
if device.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_run.sh: GPU_RUN_DEVICE=cuda but torch sees no GPU; set GPU_RUN_SMOKE=1 for a CPU smoke run")
    print("GPU:", torch.cuda.get_device_name(device))
print("data:", load_dataset("fashion-mnist", "test", download=False))  # raises, saying where it looked, if missing
EOF
MODELS=(minidiff)  # and diffusers' twin where diffusers is installed (not in smoke runs: its import is slow)
if [[ "${GPU_RUN_SMOKE:-0}" != "1" ]] && "$PY" -c "import diffusers" 2>/dev/null; then MODELS+=(diffusers); fi
echo "throughput models: ${MODELS[*]}" | tee -a "$OUT/env.txt"

throughput() {  # throughput SECONDS PRESET SETUP...: one process (stopped after SECONDS), a JSON line per setup
  local seconds="$1" preset="$2" size=28 batch=64
  shift 2
  if [[ "$preset" == cifar ]]; then size=32 batch=128; fi
  timeout "$seconds" "$PY" benchmarks/unet_throughput.py --preset "$preset" --size "$size" --batch "$batch" \
    --device "$DEVICE" --models "${MODELS[@]}" --setups "$@" --out "$OUT/throughput.jsonl" \
    "${THROUGHPUT_ARGS[@]}" "${THREADS[@]}" 2>&1 | tee -a "$OUT/throughput.log"
}

# ---------------------------------------------------------------- 1. throughput without compile
for preset in $PRESETS_LIST; do
  mark "throughput $preset: $SETUPS"
  # shellcheck disable=SC2086  # $SETUPS is a list of names
  throughput 150 "$preset" $SETUPS
done

# ---------------------------------------------------------------- 2. fixed-budget training, then export
mark "training $TRAIN_STEPS steps (stopped after $TRAIN_SECONDS s if not done)"
status=0
timeout "$TRAIN_SECONDS" "$PY" -m minidiff.train --dataset fashion-mnist --preset tiny --conditional \
  --prediction flow --schedule straight --lr 1e-3 --warmup 200 --ema-decay 0.999 --p-uncond 0.1 \
  --steps "$TRAIN_STEPS" "${TRAIN_ARGS[@]}" --out "$OUT/run" --device "$DEVICE" --no-progress "${THREADS[@]}" \
  --export "$OUT/model.safetensors" --export-dtype float32 2>&1 | tee "$OUT/train.log" || status=$?
if [[ $status -eq 124 ]]; then
  mark "training stopped by the $TRAIN_SECONDS s guard; exporting its last checkpoint (the card says its step)"
  "$PY" -m minidiff.train export "$OUT/run" "$OUT/model.safetensors" --dtype float32
elif [[ $status -ne 0 ]]; then
  echo "gpu_run.sh: training failed with status $status (see $OUT/train.log)" >&2
  exit "$status"
fi

# ---------------------------------------------------------------- 3. quality of the exported model, samples
mark "evaluation: n=$N, NFE $NFE, guidance 1 and 3"
# shellcheck disable=SC2086  # $NFE is a list of numbers
"$PY" benchmarks/flow_vs_diffusion.py --models "$OUT/model.safetensors" --samplers dpmpp_2m --nfe $NFE \
  --guidance 1 3 --n "$N" --out "$OUT/results/quality.json" --card "$OUT/model.json" "${THREADS[@]}" \
  | tee "$OUT/results/quality.txt"
last_grid="$(ls "$OUT"/run/samples/step_*.png | sort | tail -n 1)"
cp "$last_grid" "$OUT/results/samples.png"

# ---------------------------------------------------------------- 4. throughput under torch.compile, in the time left
read -r -a presets <<<"$PRESETS_LIST"
for i in "${!presets[@]}"; do
  if [[ -z "$COMPILE_SETUPS" ]]; then break; fi
  guard=$(( (TOTAL_SECONDS - (SECONDS - START)) / (${#presets[@]} - i) ))  # an equal share of what is left
  if [[ $guard -lt 30 ]]; then mark "no time left for torch.compile of ${presets[*]:i}"; break; fi
  mark "throughput ${presets[i]}: $COMPILE_SETUPS (stopped after $guard s)"
  status=0
  # shellcheck disable=SC2086  # $COMPILE_SETUPS is a list of names
  throughput "$guard" "${presets[i]}" $COMPILE_SETUPS || status=$?
  if [[ $status -ne 0 ]]; then mark "compile throughput of ${presets[i]} ended with status $status (124: the guard)"; fi
done

mark "done: results in $OUT"
