#!/usr/bin/env bash
# sft through src.train_sft; see scripts/README.md.
#   bash scripts/run_sft.sh                                  # one GPU, or the CPU when there is none
#   NUM_GPUS=8 bash scripts/run_sft.sh --set parallel.strategy=fsdp2
#   CONFIG=configs/train/sft.yaml bash scripts/run_sft.sh --resume auto
# Default CONFIG: configs/train/sft.yaml (tiny; runs on the CPU when there is no GPU).
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch sft configs/train/sft.yaml configs/train/sft.yaml "$@"
