#!/usr/bin/env bash
# Pretraining across nodes: the same command on every node, torchrun joining them through a c10d
# rendezvous on the first one. Node 0 first prepares the run folder (`kiln pretrain --prepare-only`:
# the token files and OUTPUT/profile.yaml); then every node's torchrun starts
# `python -m pipeline.train.launch OUTPUT` in each of its processes (pipeline/train/launch.py).
# kiln reads RANK, LOCAL_RANK and WORLD_SIZE from torchrun (pipeline/train/distributed.py): each
# process takes its GPU (gloo processes on a CPU-only node) and its slice of every batch; rank 0
# alone writes checkpoints, the model and summary.json. The clean corpus, the tokenizer and OUTPUT
# must be on a file system every node mounts. With MAX_RESTARTS > 0 torchrun restarts every node's
# processes when one fails, and they resume from the last checkpoint.
#
#   NODES=2 NODE_RANK=0 MASTER=gpu-node-0 docs/deploy/pretrain-multinode.sh /shared/kiln/work/300m   # on node 0
#   NODES=2 NODE_RANK=1 MASTER=gpu-node-0 docs/deploy/pretrain-multinode.sh /shared/kiln/work/300m   # on node 1
#
# Settings (environment): NODES, NODE_RANK, MASTER (node 0's address) are required; PORT (29500),
# GPUS_PER_NODE (8), PROFILE (300m, a name or a .yaml file), OUTPUT ($WORK/base_model), RUN_ID,
# MAX_RESTARTS (1), RDZV_READ_TIMEOUT (300), STOP_AFTER (a step: end there with a checkpoint, which
# the next start resumes), PYTHON (.venv/bin/python), PREPARE (1: node 0 prepares; 0: OUTPUT is prepared),
# LOCAL_ADDR (this node's address for the others, when its host name does not resolve to it).
set -euo pipefail
WORK="${1:?give the work folder of the profile, e.g. /shared/kiln/work/300m}"
PYTHON="${PYTHON:-.venv/bin/python}"
OUTPUT="${OUTPUT:-$WORK/base_model}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-eth0}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
if [ "${NODE_RANK:?}" = 0 ] && [ "${PREPARE:-1}" = 1 ]; then
  # before this node's torchrun starts, so no node's processes start before the folder is ready
  "$PYTHON" -m pipeline.cli pretrain --prepare-only --profile "${PROFILE:-300m}" \
    --clean "$WORK/clean_corpus" --tokenizer "$WORK/tokenizer/tokenizer" --output "$OUTPUT"
fi
# Node 0's agent hosts the rendezvous store, said outright: torchrun otherwise lets every agent
# whose host name matches MASTER race to host it (all of them, when the nodes share one machine).
# A store read waits up to RDZV_READ_TIMEOUT seconds (torchrun's default 60 is short on a busy node).
[ "$NODE_RANK" = 0 ] && HOST_STORE=1 || HOST_STORE=0
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NODES:?}" --node-rank "$NODE_RANK" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER:?}:${PORT:-29500}" --rdzv-id "kiln-${RUN_ID:-pretrain}" \
  --rdzv-conf "is_host=$HOST_STORE,read_timeout=${RDZV_READ_TIMEOUT:-300}" \
  --max-restarts "${MAX_RESTARTS:-1}" ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} \
  -m pipeline.train.launch "$OUTPUT" ${STOP_AFTER:+--stop-after "$STOP_AFTER"}
