#!/usr/bin/env bash
# Every check and measurement that needs a GPU, in one command, most important first, each step
# with its own time limit (docs/gpu-checks.md, docs/benchmarks.md). From the repository root,
# the real MNIST in $DATA_DIR (default .mnist, git-ignored):
#   bash tests/gpu_checks.sh OUT_DIR [STEP ...]     # STEPs: only these (names below)
#   bash tests/gpu_checks.sh --dry-run OUT_DIR      # rehearsal on CPU: every step, tiny, seconds
# Each step's result is printed and appended to OUT_DIR/summary.txt the moment it is known, so
# a run cut off halfway leaves the first results on disk. The first five steps (1-3: the
# default recipe cold and warm, the fast recipe's seeds, the benchmark at 2048 and at 256) fit
# one call of 8 minutes: their limits add up to 480 s, sized from the times measured on an H100
# (docs/benchmarks.md, "Targets"). The rest follow, to run by name (STEPs) in another call
# where a GPU is held for less. At the end, OUT_DIR/bundle.tgz
# holds every result file but weights and checkpoints, for copying off a machine in one piece.
# Runs from the checkout without installing it; --report-to none (GPU images often lack wandb).
set -uo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT=${1:-gpu-results}
ONLY=" ${*:2} "
DATA=${DATA_DIR:-.mnist}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import json, sys; from dist_resnet import provenance; json.dump(provenance.describe(sys.argv[1]), sys.stdout, indent=1)" \
    "$([[ $DRY == 1 ]] && echo cpu || echo cuda)" > "$OUT/provenance.json" 2>&1
nvidia-smi >> "$OUT/nvidia-smi.txt" 2>&1

if [[ $DRY == 1 ]]; then  # the same steps, tiny, on the CPU, on the tests' small data set
    DATA="$OUT/data"
    python -c "import sys; sys.path.insert(0, 'tests'); from mnist_files import write_mnist; write_mnist(__import__('pathlib').Path(sys.argv[1]))" "$DATA"
    TINY=(--cpu --widths 4,4,4 --epochs 1 --batch-size 64)
    BENCH=(--device cpu --steps 1 --warmup 1)
    COMPILED=eager_fp32  # compiling takes minutes on 2 CPU cores; CUDA graphs need CUDA
    CUDAGRAPHS=bf16_channels_last
    SEEDS=0,1
    SCALE=4  # the limits are a GPU's; two CPU cores are slower even at this size
else
    TINY=()
    BENCH=(--device cuda)
    COMPILED=compiled
    CUDAGRAPHS=compiled_cudagraphs
    SEEDS=0,1,2,3,4
    SCALE=1
fi
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
TRAIN=(python dist_resnet/train.py --data-dir "$DATA" --no-download --report-to none)
FAST=(--mixed-precision bf16 --channels-last --compile)
[[ $DRY == 1 ]] && FAST=(--mixed-precision bf16 --channels-last)  # compiling on 2 CPU cores takes minutes

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, keep its log, say how it went
    local name=$1 limit=$(($2 * SCALE)) start=$SECONDS status
    shift 2
    [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    [[ $status == 124 || $status == 137 ]] && status="TIMED OUT after $limit s"
    echo "$name: exit $status, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    python tests/gpu_results.py "$OUT" "$name" | tee -a "$OUT/summary.txt"
}

# 1. The default 60-epoch recipe with the recommended speed options, launch to report, compiled
#    cold (an empty inductor cache directory); then again on another empty one, warm from the
#    first run's artifacts in --compile-cache (docs/compile-cache.md). Targets: launch to first
#    step <= 5 s warm, launch to report <= 20 s warm (the startup records, and the step's time).
CACHE=(--compile-cache "$OUT/compile-cache")
rm -rf "$OUT/inductor-cold" "$OUT/inductor-warm" "$OUT/compile-cache"
step default_recipe 90 env TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-cold" "${TRAIN[@]}" "${FAST[@]}" "${CACHE[@]}" \
    "${TINY[@]}" --output-dir "$OUT/default_recipe"
step warm_recipe 60 env TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-warm" "${TRAIN[@]}" "${FAST[@]}" "${CACHE[@]}" \
    "${TINY[@]}" --output-dir "$OUT/warm_recipe"
# 2. --recipe fast: time to 99% (compile excluded), 5 seeds in one process (compiled once).
step fast_seeds 90 python -m dist_resnet.bench "${BENCH[@]}" --data-dir "$DATA" --configs "$COMPILED" \
    --time-to-accuracy 0.99 --seeds "$SEEDS" --json-out "$OUT/fast_seeds.jsonl" -- --recipe fast "${TINY[@]}"
# 3. The benchmark at global batch 2048, every configuration but max-autotune (step 8), the
#    notebook loop as the baseline in the same run; `compiled` warm from step 1's compile cache
#    (the same graphs), so that it does not compile for a minute. Then at 256 per GPU (the
#    8-GPU share of 2048), with CUDA graphs.
step bench_2048 150 python -m dist_resnet.bench "${BENCH[@]}" --data-dir "$DATA" \
    --configs "notebook,eager_fp32,bf16_channels_last,$COMPILED,$CUDAGRAPHS" --json-out "$OUT/bench_2048.jsonl" \
    -- "${TINY[@]}" "${CACHE[@]}"
step bench_256 90 python -m dist_resnet.bench "${BENCH[@]}" --data-dir "$DATA" \
    --configs "eager_fp32,$CUDAGRAPHS" --json-out "$OUT/bench_256.jsonl" -- --batch-size 256 "${TINY[@]}" "${CACHE[@]}"
# 4. SyncBatchNorm equals whole-batch BatchNorm: 2 ranks sharing the GPU over gloo, and NCCL
#    where there is a GPU per rank.
if [[ $DRY == 1 ]]; then
    step sync_bn 30 python -m pytest -q tests/test_sync_bn_check.py -k "passes or fails"
else
    step sync_bn 40 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sync_bn_check.py \
        --out "$OUT/sync_bn.json"
    [[ $GPUS -ge 2 ]] && step sync_bn_nccl 30 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/sync_bn_check.py --backend nccl --out "$OUT/sync_bn_nccl.json"
fi
# 5. The training paths no GPU run has taken: fp16 (a gradient scaler) with clipping after the
#    unscaling, and the EMA with gradient accumulation. Each: a pass/fail line (every logged
#    loss and norm finite, the run's report written) and its accuracy after 3 epochs.
step fp16_clip_recipe 40 "${TRAIN[@]}" --mixed-precision fp16 --clip-grad 1.0 --epochs 3 --log-every 5 \
    "${TINY[@]}" --output-dir "$OUT/fp16_clip_recipe"
step ema_accumulate_recipe 40 "${TRAIN[@]}" --mixed-precision bf16 --ema 0.99 --accumulate 2 --epochs 3 \
    --log-every 5 "${TINY[@]}" --output-dir "$OUT/ema_accumulate_recipe"
# 6. Which lines of the real step loop make the host wait for the GPU: eager, and fast.
SYNC_CHECK=(python tests/sync_check.py --data-dir "$DATA")
[[ $DRY == 1 ]] && SYNC_CHECK+=(--dry-run --cpu --widths 4,4,4)  # its own steps and batch
step host_syncs 25 "${SYNC_CHECK[@]}" --output-dir "$OUT/host_syncs" --out "$OUT/host_syncs.json"
step host_syncs_fast 35 "${SYNC_CHECK[@]}" --output-dir "$OUT/host_syncs_fast" --out "$OUT/host_syncs_fast.json" \
    "${FAST[@]}"
# 7. What --deterministic costs: 5 epochs of the default recipe, eager, with and without it.
step eager_recipe 30 "${TRAIN[@]}" --mixed-precision bf16 --channels-last --epochs 5 "${TINY[@]}" \
    --output-dir "$OUT/eager_recipe"
step deterministic_recipe 30 "${TRAIN[@]}" --mixed-precision bf16 --channels-last --deterministic --epochs 5 \
    "${TINY[@]}" --output-dir "$OUT/deterministic_recipe"
# 8. The compiler's slower options at 2048: max-autotune (minutes of tuning) and CUDA graphs.
AUTOTUNE=compiled_max_autotune,compiled_cudagraphs
[[ $DRY == 1 ]] && AUTOTUNE=eager_fp32  # both need CUDA (and minutes of compiling on a CPU)
step bench_autotune 150 python -m dist_resnet.bench "${BENCH[@]}" --data-dir "$DATA" --configs "$AUTOTUNE" \
    --json-out "$OUT/bench_autotune.jsonl" -- "${TINY[@]}"
# 9. The 99.5% augmented recipe from the README.
step augment_recipe 60 "${TRAIN[@]}" "${FAST[@]}" --augment --epochs 20 --batch-size 256 --schedule onecycle \
    --lr 4e-3 --label-smoothing 0.1 --bn-recalibrate 16 "${TINY[@]}" --output-dir "$OUT/augment_recipe"
BUNDLE=$(mktemp "${TMPDIR:-/tmp}/gpu-checks-XXXXXX.tgz")  # written outside OUT_DIR, which it archives
tar czf "$BUNDLE" --exclude='*.safetensors' --exclude=checkpoints --exclude=bundle.tgz \
    -C "$(dirname "$OUT")" "$(basename "$OUT")" && chmod 644 "$BUNDLE" && mv "$BUNDLE" "$OUT/bundle.tgz"
echo "done: $OUT/summary.txt, everything in $OUT/bundle.tgz"
