#!/usr/bin/env bash
# Tokenize the data source of a train config into memory-mapped token shards.
#
#   bash scripts/prepare_data.sh configs/train/pretrain_openwebtext_shards.yaml   # data.type shards: writes data.path
#   bash scripts/prepare_data.sh configs/train/pretrain.yaml --out data/shards_sample  # a local source: --out
#   bash scripts/prepare_data.sh CONFIG --workers 8                 # more tokenizer processes
#   bash scripts/prepare_data.sh CONFIG --overwrite data.val_fraction=0.001
#   bash scripts/prepare_data.sh CONFIG --out /path/to/shards      # when data.type is local / streaming
#
# The config's data: block says what to read (data.source when data.type is shards) and where to
# write (data.path); the same config then trains on the shards. Re-running on the same input gives
# byte-identical shards. Extra arguments go to `python -m src.dataset.pretrain prepare`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
  echo "usage: bash scripts/prepare_data.sh CONFIG [--workers N] [--out DIR] [--overwrite] [data.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
PYTHON=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ] && [ "$PYTHON" = python ]; then
  PYTHON=.venv/bin/python
fi
exec "$PYTHON" -m src.dataset.pretrain prepare --config "$CONFIG" "$@"
