#!/usr/bin/env bash
# recipec llama3_8b: 16 processes on 2 node(s)
# fingerprint sha256:<fingerprint>
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0
export OMP_NUM_THREADS=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export PYTHONUNBUFFERED=1
NODE_RANK="${NODE_RANK:?set NODE_RANK to the index of this node (0..1)}"
exec python -m recipec.compiler.supervisor -- torchrun --nnodes=2 --nproc-per-node=8 --node-rank="$NODE_RANK" --rdzv-backend=c10d --rdzv-endpoint=node0001:29500 --rdzv-id=llama3_8b --rdzv-conf=join_timeout=600 --max-restarts=0 --log-dir=runs/llama3_8b/logs/torchrun --tee=3 -m recipec.runtime.train --artifact build/llama3_8b "$@"
