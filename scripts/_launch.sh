#!/usr/bin/env bash
# Shared by run_pretrain.sh, run_sft.sh and run_dpo.sh: set up the environment, then start
# `python -m src.train_<task>` directly (one process) or through torchrun (several).
#   usage (from those scripts): launch TASK DEFAULT_GPU_CONFIG DEFAULT_CPU_CONFIG "$@"
set -euo pipefail

launch() {
  local task=$1 gpu_config=$2 cpu_config=$3
  shift 3
  cd "$(dirname "${BASH_SOURCE[0]}")/.."

  # The environment: PYTHON if given (an interpreter that already has the requirements), else
  # .venv with requirements.txt installed, (re)installed whenever requirements.txt changed since
  # the last install that finished (the stamp scripts/test.sh keeps too). An install that fails
  # (an offline machine) leaves no stamp, so the next run tries again instead of starting with a
  # half-filled .venv.
  local python=${PYTHON:-}
  if [ -z "$python" ]; then
    VENV=${VENV:-.venv}
    local stamp="$VENV/.requirements.sha" want
    want=$(sha256sum requirements.txt | cut -d' ' -f1)
    if [ ! -x "$VENV/bin/python" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
      echo "[run_$task] installing requirements.txt into $VENV (again only when it changes)"
      [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
      "$VENV/bin/python" -m pip install -q --upgrade pip || echo "[run_$task] pip not upgraded; going on with $("$VENV/bin/python" -m pip --version | cut -d' ' -f1-2)"
      if ! "$VENV/bin/python" -m pip install -q -r requirements.txt; then
        echo "[run_$task] could not install requirements.txt into $VENV (no package index reachable?)." >&2
        echo "[run_$task] Install it there yourself, or name an interpreter that has it: PYTHON=/path/to/python bash scripts/run_$task.sh ..." >&2
        exit 1
      fi
      echo "$want" > "$stamp"
    fi
    python="$VENV/bin/python"
  fi

  # NVLink SHARP / multicast stay off: they hang or fail on machines where the fabric is partitioned.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  # Growable allocator segments: the caching allocator then holds about what the run uses (on an
  # H100, Qwen2-0.5B compiled as one graph reserved 16.1 GiB instead of 27.6 for 15.6 allocated;
  # same speed). Set PYTORCH_CUDA_ALLOC_CONF yourself to choose otherwise.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

  local gpus
  gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
  local config=${CONFIG:-}
  if [ -z "$config" ]; then
    if [ "$gpus" -gt 0 ]; then config=$gpu_config; else config=$cpu_config; fi
  fi
  NUM_GPUS=${NUM_GPUS:-$([ "$gpus" -gt 0 ] && echo 1 || echo 0)}
  NNODES=${NNODES:-1}
  NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-29500}
  if [ "$NUM_GPUS" -gt "$gpus" ]; then
    echo "[run_$task] NUM_GPUS=$NUM_GPUS but this machine has $gpus GPU(s)" >&2
    if [ "$gpus" -eq 0 ]; then
      # Several CPU processes (gloo) are a test set-up, not a training one: started by hand.
      echo "[run_$task] several CPU processes (gloo) start with torchrun directly: $python -m torch.distributed.run" \
        "--standalone --nproc_per_node=N -m src.train_$task --config $config --set parallel.strategy=ddp" \
        "--set trainer.micro_batch_size=2   (the bundled samples' validation splits fill 2 rows per rank at N=2)" >&2
    fi
    exit 2
  fi
  if [ "$NNODES" -gt 1 ] && [ "$NUM_GPUS" -lt 1 ]; then
    echo "[run_$task] NNODES=$NNODES needs NUM_GPUS >= 1 process per node; this machine has no GPU" >&2
    exit 2
  fi

  echo "[run_$task] config $config | GPUs per node $NUM_GPUS | nodes $NNODES"
  if [ "$NUM_GPUS" -le 1 ] && [ "$NNODES" -eq 1 ]; then
    # One process: the GPU if there is one, else the CPU (trainer.device: auto).
    exec "$python" -m "src.train_$task" --config "$config" "$@"
  fi
  # On SIGTERM (a scheduler's stop) torchrun forwards it to the ranks, which save a checkpoint
  # before they exit, and kills them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds: 30 by default,
  # short for a large model's save. 600 here, the grace a scheduler usually gives (torchrun's
  # --shutdown-timeout reads the variable in torch 2.13; a torchrun without it keeps its fixed 30 s).
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
  exec "$python" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NUM_GPUS" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m "src.train_$task" --config "$config" "$@"
}
