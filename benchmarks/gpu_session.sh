#!/usr/bin/env bash
# One batched device session: GPU tests, the fused linear GPU routes, a profile of the fastest,
# an optional tile sweep, then the linear workloads against every peer with the fastest routes.
# Peers' pure-Python wheels (trl, liger-kernel, cut-cross-entropy) unpacked under .whl/site and
# verl's file under .whl/cache travel with the tree (the device has no network). Writes
# everything under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.whl/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export ENTROPY_KERNELS_BENCH_CACHE="$PWD/.whl/cache"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "tree: $(cat .tree-commit 2>/dev/null || git rev-parse HEAD)"
timeout "${TEST_S:-150}" python -m pytest ${TESTS:-tests/test_gpu_linear.py tests/test_gpu.py} -q \
    -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/test_gpu.txt"
cd benchmarks
# ROUTES_S: time the fused linear GPU routes (forward and forward + backward) first; the fastest
# pair's gradient route then serves the profile and the peers' run (the forward stays "auto",
# which picks by whether gradients are wanted: the "forward ..." rows time it without them).
if [ "${ROUTES_S:-0}" != 0 ]; then
    timeout "$ROUTES_S" python linear_sweep.py --routes-only --out "$OUT/routes.json" 2>&1 | tail -12
    if [ -s "$OUT/routes.json" ]; then
        best=$(python -c "import json; print(json.load(open('$OUT/routes.json'))['routes_ms']['best'])")
        export ENTROPY_KERNELS_LINEAR_GPU_BACKWARD="${best##*/}"
        # A training forward on cuBLAS tiles only when that pair was the fastest ("auto" keeps
        # them for forwards without gradients either way).
        [ "${best%%/*}" = blas-triton-fold ] && export ENTROPY_KERNELS_LINEAR_GPU_FORWARD=blas-triton-fold
        echo "fastest routes: $best"
    fi
fi
# FP16_S: the routes once more with float16 heads (their split takes more matmuls).
if [ "${FP16_S:-0}" != 0 ]; then
    timeout "$FP16_S" python linear_sweep.py --routes-only --dtype float16 \
        --out "$OUT/routes-fp16.json" 2>&1 | tail -12
fi
# BLAS_TILES ("RxV,RxV,..."): time the default routes with each cuBLAS tile shape; the fastest
# then serves the profile and the peers' run.
if [ -n "${BLAS_TILES:-}" ]; then
    timeout "${TILES_S:-90}" python linear_sweep.py --blas-tiles "$BLAS_TILES" \
        --out "$OUT/blas-tiles.json" 2>&1 | tail -12
    if [ -s "$OUT/blas-tiles.json" ]; then
        tile=$(python -c "import json; print(json.load(open('$OUT/blas-tiles.json'))['routes_ms']['best tile'])")
        export ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE="$tile"
        echo "fastest cuBLAS tile: $tile"
    fi
fi
# PROFILE_ROUTES: comma-separated FORWARD/BACKWARD pairs to profile (host and device time).
if [ "${PROFILE_S:-0}" != 0 ]; then
    timeout "$PROFILE_S" python profile_linear.py ${PROFILE_ROUTES:+--routes "$PROFILE_ROUTES"} \
        --out "$OUT/profile.txt" 2>&1 | grep -E "^(linear_policy_loss|wall|  [0-9])"
fi
if [ "${SWEEP_S:-0}" != 0 ]; then
    timeout "$SWEEP_S" python linear_sweep.py --out "$OUT/tiles.json" 2>&1 | tail -40
fi
tiles=()
[ -s "$OUT/tiles.json" ] && tiles=(--linear-tiles "$OUT/tiles.json")
# BENCH_S: the linear workloads against every peer (0 skips them).
if [ "${BENCH_S:-200}" != 0 ]; then
    timeout "${BENCH_S:-200}" python run.py --workloads linear_scoring,linear_policy_loss \
        --dtypes bfloat16 --linear 4096x2048x151936 --impls "${IMPLS:-eager,trl,liger-ce,liger-grpo,verl,cce,ours-triton}" \
        --no-download --no-plots --tag linear-peers --out-dir "$OUT/bench" "${tiles[@]}" 2>&1 | tail -40
fi
# ROUNDED_S: ours with dlogits rounded to bfloat16 (opt-in, outside the spec) beside TRL.
if [ "${ROUNDED_S:-0}" != 0 ]; then
    ENTROPY_KERNELS_LINEAR_GPU_BACKWARD=blas-bf16-dlogits timeout "$ROUNDED_S" python run.py \
        --workloads linear_policy_loss --dtypes bfloat16 --linear 4096x2048x151936 \
        --impls trl,ours-triton --no-download --no-plots --tag linear-rounded \
        --out-dir "$OUT/rounded" 2>&1 | tail -12
fi
# LOGITS_S: the logits-level workloads at the README's GPU size.
if [ "${LOGITS_S:-0}" != 0 ]; then
    timeout "$LOGITS_S" python run.py --workloads scoring,policy_loss,gtpo_loss --dtypes bfloat16 \
        --tokens 16384 --vocab 151936 --impls eager,compile,ours-triton,ours-triton-inplace \
        --no-download --no-plots --tag logits-bf16 --out-dir "$OUT/logits" 2>&1 | tail -30
fi
