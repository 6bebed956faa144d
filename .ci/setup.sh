#!/usr/bin/env bash
# Idempotent set-up of ./.venv: torch (never upgraded), triton, the package with the test,
# benchmark, dev and TRL extras, and OpenRLHF's source (--no-deps: deepspeed and flash-attn
# do not install on CPU; the tests stub them). The README's quick-start commands start with it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: an unpinned requirement would pull a multi-GB CUDA build on a CPU machine.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# Pin whatever torch is installed (the CPU build here, a CUDA build on a GPU box).
constraints=$(mktemp)
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
pip install -q -c "$constraints" -e ".[test,bench,dev,trl]"
pip install -q --no-deps "openrlhf==0.11.2"
# Triton < 3.7's interpreter (the CPU test path) fails on NumPy >= 2.4 (3.6.0: checked).
python - 2>/dev/null <<'EOF' && pip install -q -c "$constraints" "numpy<2.4"
import importlib.metadata as metadata, sys
version = tuple(int(part) for part in metadata.version("triton").split(".")[:2])
sys.exit(0 if version < (3, 7) else 1)
EOF
rm -f "$constraints"
