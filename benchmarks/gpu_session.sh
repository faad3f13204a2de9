#!/usr/bin/env bash
# The GPU checks of issues #2 and #3 in one device call, results under $OUT.
#
# On a lent machine (the `device` tool), from the repo root, with the pydantic wheels the image lacks
# in .whl/ (ignored by git; fetch them once here, see benchmarks/BENCHMARKS.md, "On a GPU"):
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Order: what #2 still needs first, so a call cut short keeps it.
#   1. gpu_extraction.py per-token: GPT-2-small shape, blocks.*, pooling none, extract MB/s against
#      a raw write (#2's >= 0.8 target on a GPU), at the GPU default (512 MB shards) and at 128 MB.
#   1b. the tests that need CUDA (`pytest tests/test_extract.py -k gpu`; CI has no GPU and skips them).
#   2. disk_latency.py: create, fsync and rename latency on that disk (the store's cost per file), then
#      store_write.py: the store alone against a raw write + fsync of the same bytes, on that disk
#      (12 layers x 100,000 rows x 768 float32 in 4 shards).
#   3. gpu_extraction.py llama: a Llama-shaped ~1B model, mean-pooled blocks.*, tokens/s against a
#      bare forward (#3's prepared GPU check).
#   4. pooling.py: mean pooling of 22 bfloat16 layers as extraction does it against the elementwise form.
#   5. d2h_copy.py: a 128 MB shard copied to the host as extraction does (`.cpu()`) against reused
#      pageable and pinned buffers: whether pinned shard buffers are worth building.
#   6. tokenize_threads.py: tokenising 100,000 prompts on tokenize_threads() threads against one
#      (what the machine's 16 CPUs give the step every extraction runs before its first forward).
#   7. gpu_gap.py at batch 256: the bare forward, then NeuronMap's pieces added one at a time (where the
#      Llama extraction's time goes beyond the forward).
# Each step writes its own JSON, so a step that fails or runs out of time loses only itself.
# GPU_SESSION_QUICK=1 runs the same steps small on the CPU (a smoke run of this script).
# GPU_SESSION_SKIP="d2h pooling" leaves out the steps it names (the device call brings back 8 files, so
# the default leaves out d2h, whose question session 6 answered; GPU_SESSION_SKIP= runs every step).
set -uo pipefail
GPU_SESSION_SKIP=${GPU_SESSION_SKIP-d2h}

OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${GPU_SESSION_QUICK:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then  # the wheels are for the GPU image
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"

if [ "${GPU_SESSION_QUICK:-0}" = 1 ]; then
    store_args=(--layers 2 --rows 2000 --shards 2 --repeats 3)
    gpu_args=(--device cpu --quick)
    d2h_args=(--device cpu --mb 16)
    pool_args=(--device cpu --layers 4 --repeats 3)
    tok_args=(--prompts 5000 --repeats 2)
else
    store_args=(--layers 12 --rows 100000 --shards 4)
    gpu_args=()
    d2h_args=()
    pool_args=(--device cuda --dtype bfloat16)
    tok_args=()
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG"
fi

step() {  # step NAME COMMAND...: run it, keep going on failure, say how it ended
    local name=$1
    shift
    if [[ " ${GPU_SESSION_SKIP:-} " == *" $name "* ]]; then
        echo "== $name skipped (GPU_SESSION_SKIP)" | tee -a "$LOG"
        return
    fi
    echo "== $name: $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

mkdir -p /tmp/gpu-session-store /tmp/gpu-session-extract
step per_token "$PY" benchmarks/gpu_extraction.py "${gpu_args[@]}" --skip llama agreement \
    --workdir /tmp/gpu-session-extract --out "$OUT/per_token.json"
if [ "${GPU_SESSION_QUICK:-0}" != 1 ]; then  # the tests that need CUDA (skipped on CPUs, so never run by CI)
    step gpu_tests "$PY" -m pytest -q -p no:cacheprovider tests/test_extract.py -k "gpu"
fi
step disk_latency "$PY" benchmarks/disk_latency.py --workdir /tmp/gpu-session-store --out "$OUT/disk_latency.json"
step store_write "$PY" benchmarks/store_write.py "${store_args[@]}" --workdir /tmp/gpu-session-store \
    --out "$OUT/store_write.json"
step llama "$PY" benchmarks/gpu_extraction.py "${gpu_args[@]}" --skip per-token agreement \
    --workdir /tmp/gpu-session-extract --out "$OUT/llama.json"
step pooling "$PY" benchmarks/pooling.py "${pool_args[@]}" --out "$OUT/pooling.json"
step d2h "$PY" benchmarks/d2h_copy.py "${d2h_args[@]}" --out "$OUT/d2h.json"
step tokenize "$PY" benchmarks/tokenize_threads.py "${tok_args[@]}" --out "$OUT/tokenize.json"
step gap "$PY" benchmarks/gpu_gap.py "${gpu_args[@]}" --batch-size 256 --profile-batches 0 --out "$OUT/gap.json"
rm -rf /tmp/gpu-session-store /tmp/gpu-session-extract
