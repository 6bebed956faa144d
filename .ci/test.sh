#!/usr/bin/env bash
# The README's test command: set up both environments, then run the whole suite.
# The verl environment installs in the background while the main suite runs.
set -uo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh || exit 1
verl_log=$(mktemp)
bash .ci/setup-verl.sh > "$verl_log" 2>&1 &
verl_setup=$!
.venv/bin/python -m pytest -q
main_status=$?
if wait "$verl_setup"; then
    .venv-verl/bin/python -m pytest -q tests/test_integration_verl.py \
        tests/test_integration_verl_scale.py
    verl_status=$?
else
    cat "$verl_log"
    echo "verl environment set-up failed" >&2
    verl_status=1
fi
rm -f "$verl_log"
exit $(( main_status != 0 || verl_status != 0 ))
