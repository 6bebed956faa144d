#!/usr/bin/env bash
# ./.venv-verl for the verl integration tests: verl 0.9 pins transformers < 5.11, which clashes
# with TRL 1.16's, so it gets its own environment. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv-verl/bin/python ] || "$python" -m venv .venv-verl
. .venv-verl/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
constraints=$(mktemp)
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
# cachetools/uvicorn/fastapi: imported by verl's ray_trainer; TransferQueue: its V1 trainer;
# megatron-core (imports on CPU, no GPU needed): verl's Megatron engine, for the vocabulary-parallel tests.
pip install -q -c "$constraints" -e ".[test]" "verl==0.9.1" cachetools uvicorn fastapi \
    "TransferQueue>=0.1.10" "megatron-core==0.16.1"
rm -f "$constraints"
