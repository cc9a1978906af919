#!/usr/bin/env bash
# GPU checks in one go, for a short lease on a CUDA machine (docs/performance.md, "GPU").
# Benchmarks first, since they are what a lease is for; then the `gpu`-marked tests; then, if
# TRAIN_SECONDS > 0, a short run of each tiny family on `trainer=gpu` and its evaluation.
#   1. backbone: the 350m preset at S=2048 and 4096, causal vs mixed-modal (SDPA, flex), MFU
#   2. whole family steps at 350m, S=4096: tokens/s, MFU, peak memory, time by part, most rows
#   3. the training loader alone against the GPU step, both tiny recipes, batch 256
#   4. text->image sampling, both families, batch 1 / 64 / 256
#   5. fusion against transfusion-pytorch (needs the `bench` extra; skipped without it)
# Stages run in that order of priority: their limits add up to more than one 600-s device
# call, so a slow early stage leaves the later ones to the next call.
# Usage: bash scripts/gpu_check.sh [OUT_DIR] [TRAIN_SECONDS]   (defaults: outputs/gpu_check, 0)
# Each stage has its own time limit, so a slow stage (first compilation) cannot starve the rest.
set -u
OUT=${1:-outputs/gpu_check}; SECS=${2:-0}; mkdir -p "$OUT"
PY=${PYTHON:-python3}; export PYTHONUNBUFFERED=1
T0=$(date +%s); stamp() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
stage() {  # stage NAME SECONDS COMMAND...: run, keep the log, show its tail
  local name=$1 limit=$2; shift 2
  stamp "$name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "  (exit $?)"
  grep -v "Warning\|warn(" "$OUT/$name.log" | tail -12
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys,torch,lightning,diffusers;print(sys.version.split()[0],torch.__version__,lightning.__version__,diffusers.__version__)"

stage bench_transformer_2048 150 $PY scripts/bench.py transformer --configs 350m --batch 8 --seq 2048
stage bench_transformer_4096 120 $PY scripts/bench.py transformer --configs 350m --batch 4 --seq 4096
stage bench_family_step 240 $PY scripts/bench.py family-step --backbone 350m --seq 4096 \
  --rows 2 --max-rows 32 --rounds 5 --device cuda
stage bench_loader 120 $PY scripts/bench.py loader --device cuda --batch 256 --workers 0 4 8 \
  --batches 20 --rounds 10
stage bench_sampling_transfusion 90 $PY scripts/bench.py sampling --device cuda \
  --batch 1 64 256 --steps 25 --repeats 3
stage bench_sampling_chameleon 90 $PY scripts/bench.py sampling --family chameleon \
  --device cuda --batch 1 64 256 --repeats 3
stage bench_peer 90 $PY scripts/bench.py peer --device cuda
stage gpu_tests 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests

if [ "$SECS" -gt 0 ]; then
  for family in transfusion_tiny chameleon_tiny; do
    # optim.time_budget_s ends the cosine and the run after SECS seconds of training, and the
    # script then saves; the outer timeout only catches a hang (start-up and the first
    # compilation come on top). max_steps is a cap set high so that the budget decides.
    stage "train_$family" $(( SECS + 240 )) $PY scripts/train.py experiment=$family \
      trainer=gpu logger=csv data.num_workers=6 data.batch_size=256 trainer.max_steps=100000 \
      optim.time_budget_s=$SECS trainer.val_check_interval=1000 output_dir="$OUT/$family"
    stage "evaluate_$family" 300 $PY scripts/evaluate.py model --model "$OUT/$family/model" \
      --device cuda --json "$OUT/${family}_eval.json"
  done
fi
stamp done
