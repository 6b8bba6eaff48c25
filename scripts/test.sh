#!/usr/bin/env bash
# Install what the tests need (in .venv, created or reused) and run the CPU test suite.
#   bash scripts/test.sh              # everything CI runs
#   bash scripts/test.sh tests/models # a subset; extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Reinstall only when requirements.txt changed since the last successful install.
stamp="$VENV/.requirements.sha"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi

# Triton kernels run through the interpreter on the CPU; nothing reaches the network.
export TRITON_INTERPRET=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$VENV/bin/python" -m pytest -q "${@:-tests}"
