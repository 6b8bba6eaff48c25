#!/usr/bin/env bash
# pretrain through src.train_pretrain; see scripts/README.md.
#   bash scripts/run_pretrain.sh                                  # one GPU, or the CPU when there is none
#   NUM_GPUS=8 bash scripts/run_pretrain.sh --set parallel.strategy=ddp
#   NUM_GPUS=8 bash scripts/run_pretrain.sh --set parallel.strategy=fsdp2 --set compile_scope=blocks --set compile_mode=default --set optimizer.bf16_weight_copy=false
#   CONFIG=configs/train/pretrain.yaml bash scripts/run_pretrain.sh --resume auto
# Default CONFIG: configs/train/pretrain.yaml with a GPU, configs/train/pretrain_cpu.yaml without.
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch pretrain configs/train/pretrain.yaml configs/train/pretrain_cpu.yaml "$@"
