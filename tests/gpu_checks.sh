#!/usr/bin/env bash
# Every check and measurement that needs a GPU, in one run, for a session lent a GPU machine
# (docs/gpu-checks.md, docs/benchmarks.md). From the repository root, MNIST in $DATA_DIR:
#   bash tests/gpu_checks.sh OUT_DIR [STEP ...]      # STEPs: only these (names as below)
# All steps together may outlast one 10-minute device call: split them over two calls, for
# example `bash tests/gpu_checks.sh OUT/a sync_bn host_syncs host_syncs_fast default_recipe
# fast_recipe augment_recipe`, then `bash tests/gpu_checks.sh OUT/b bench_2048 bench_256
# fast_time_to_accuracy`.
# Runs from the checkout without installing it; --report-to none, since GPU images often lack
# wandb. Each step's log, JSON and outputs land in OUT_DIR; a summary is printed at the end.
set -uo pipefail
OUT=${1:-gpu-results}
ONLY=" ${*:2} "
DATA=${DATA_DIR:-.mnist}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    date -Is
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'accelerate', accelerate.__version__)"
} > "$OUT/provenance.txt" 2>&1

step() {  # step NAME COMMAND...: run it, keep its log, print its exit status and wall time
    local name=$1 start=$SECONDS
    shift
    [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

TRAIN=(python dist_resnet/train.py --data-dir "$DATA" --no-download --report-to none)
FAST_FLAGS=(--mixed-precision bf16 --channels-last --compile)

step sync_bn torchrun --standalone --nproc_per_node 2 tests/sync_bn_check.py --out "$OUT/sync_bn.json"
step bench_2048 python -m dist_resnet.bench --device cuda --data-dir "$DATA" --json-out "$OUT/bench_2048.jsonl"
step bench_256 python -m dist_resnet.bench --device cuda --data-dir "$DATA" \
    --configs eager_fp32,compiled,compiled_cudagraphs --json-out "$OUT/bench_256.jsonl" -- --batch-size 256
step fast_time_to_accuracy python -m dist_resnet.bench --device cuda --data-dir "$DATA" \
    --configs compiled,compiled_cudagraphs --time-to-accuracy 0.99 --json-out "$OUT/fast_time_to_accuracy.jsonl" \
    -- --recipe fast
step host_syncs python tests/sync_check.py --data-dir "$DATA" --output-dir "$OUT/host_syncs" \
    --out "$OUT/host_syncs.json"
step host_syncs_fast python tests/sync_check.py --data-dir "$DATA" --output-dir "$OUT/host_syncs_fast" \
    --out "$OUT/host_syncs_fast.json" "${FAST_FLAGS[@]}"
step default_recipe "${TRAIN[@]}" "${FAST_FLAGS[@]}" --output-dir "$OUT/default_recipe"
step fast_recipe "${TRAIN[@]}" --recipe fast --output-dir "$OUT/fast_recipe"
step augment_recipe "${TRAIN[@]}" "${FAST_FLAGS[@]}" --augment --epochs 20 --batch-size 256 \
    --schedule onecycle --lr 4e-3 --label-smoothing 0.1 --bn-recalibrate 16 --output-dir "$OUT/augment_recipe"

for run in default_recipe fast_recipe augment_recipe; do
    [[ -f "$OUT/$run/classification_report.json" ]] || continue
    python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'test accuracy', r['accuracy'])" \
        "$OUT/$run/classification_report.json" "$run" 2>/dev/null | tee -a "$OUT/summary.txt"
done
cat "$OUT/sync_bn.json" "$OUT"/host_syncs*.json 2>/dev/null | tee -a "$OUT/summary.txt"
