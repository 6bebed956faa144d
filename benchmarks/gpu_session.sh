#!/usr/bin/env bash
# One batched device session: GPU tests, the fused linear tile sweep, then the linear workloads
# against every peer with the sweep's best tiles. Peers' pure-Python wheels (trl, liger-kernel,
# cut-cross-entropy) unpacked under .whl/site and verl's file under .whl/cache travel with the
# tree (the device has no network). Writes everything under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.whl/site" TRITON_INTERPRET=0
export ENTROPY_KERNELS_BENCH_CACHE="$PWD/.whl/cache"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "tree: $(cat .tree-commit 2>/dev/null || git rev-parse HEAD)"
timeout "${TEST_S:-150}" python -m pytest tests/test_gpu_linear.py tests/test_gpu.py -q -x \
    -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/test_gpu.txt"
cd benchmarks
# SWEEP_S=0: no sweep, the benchmark runs the package's default tiles. ROUTES_S: time the
# fused linear gradient routes (tl.dot kernels, cuBLAS tiles with the torch or the Triton
# fold, torch backend) first.
if [ "${ROUTES_S:-0}" != 0 ]; then
    timeout "$ROUTES_S" python linear_sweep.py --routes-only --out "$OUT/routes.json" 2>&1 | tail -8
fi
if [ "${SWEEP_S:-150}" != 0 ]; then
    timeout "${SWEEP_S:-150}" python linear_sweep.py --out "$OUT/tiles.json" 2>&1 | tail -40
fi
tiles=()
[ -s "$OUT/tiles.json" ] && tiles=(--linear-tiles "$OUT/tiles.json")
timeout "${BENCH_S:-200}" python run.py --workloads linear_scoring,linear_policy_loss \
    --dtypes bfloat16 --linear 4096x2048x151936 --impls "${IMPLS:-eager,trl,liger-ce,liger-grpo,verl,cce,ours-triton}" \
    --no-download --no-plots --tag linear-peers --out-dir "$OUT/bench" "${tiles[@]}" 2>&1 | tail -40
