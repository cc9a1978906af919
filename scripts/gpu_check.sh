#!/usr/bin/env bash
# GPU checks in one go, for a short lease on a CUDA machine (docs/performance.md, "GPU"):
#   1. the `gpu`-marked tests (compiled FlexAttention vs SDPA),
#   2. the sampling benchmark on CUDA,
#   3. a short run of each tiny family on `trainer=gpu` (bf16, compiled flex), then the demo's
#      evaluation of the saved model.
# Usage: bash scripts/gpu_check.sh [OUT_DIR] [TRAIN_SECONDS]   (defaults: outputs/gpu_check, 120)
# Each stage has its own time limit, so a slow stage (first compilation) cannot starve the rest;
# training stops at its wall-clock budget with the schedule complete, so the model is saved.
set -u
OUT=${1:-outputs/gpu_check}; SECS=${2:-120}; mkdir -p "$OUT"
PY=${PYTHON:-python3}; export PYTHONUNBUFFERED=1
T0=$(date +%s); stamp() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys,torch,lightning,diffusers;print(sys.version.split()[0],torch.__version__,lightning.__version__,diffusers.__version__)"

stamp "gpu tests"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"

stamp "sampling benchmark"
timeout 180 $PY scripts/bench.py sampling --device cuda --batch 8 --steps 25 100 --repeats 3 \
  > "$OUT/bench_sampling.log" 2>&1
tail -4 "$OUT/bench_sampling.log"

for family in transfusion_tiny chameleon_tiny; do
  stamp "train $family for ${SECS}s"
  # optim.time_budget_s ends the cosine and the run after SECS seconds of training, and the
  # script then saves; the outer timeout only catches a hang (start-up and the first
  # compilation come on top). max_steps is a cap set high so that the budget decides.
  timeout $(( SECS + 240 )) $PY scripts/train.py experiment=$family trainer=gpu logger=csv \
    data.num_workers=6 data.batch_size=256 trainer.max_steps=100000 \
    optim.time_budget_s=$SECS trainer.val_check_interval=1000 \
    output_dir="$OUT/$family" > "$OUT/$family.log" 2>&1
  tr '\r' '\n' < "$OUT/$family.log" | grep "it/s" | tail -1
  stamp "evaluate $family"
  timeout 300 $PY scripts/evaluate.py model --model "$OUT/$family/model" --device cuda \
    --json "$OUT/${family}_eval.json" 2>&1 | grep -v "it/s\|img/s" | tail -12
done
stamp done
