#!/usr/bin/env bash
# dpo through src.train_dpo; see scripts/README.md.
#   bash scripts/run_dpo.sh                                  # one GPU, or the CPU when there is none
#   NUM_GPUS=8 bash scripts/run_dpo.sh --set parallel.strategy=fsdp2
#   CONFIG=configs/train/dpo.yaml bash scripts/run_dpo.sh --resume auto
# Default CONFIG: configs/train/dpo.yaml (tiny; runs on the CPU when there is no GPU).
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch dpo configs/train/dpo.yaml configs/train/dpo.yaml "$@"
