#!/usr/bin/env bash
# Pretraining across nodes: the same command on every node, torchrun joining them through a
# rendezvous on the first one. kiln reads RANK, LOCAL_RANK and WORLD_SIZE from torchrun
# (pipeline/train/distributed.py): each process takes its GPU and its slice of every batch, rank 0
# writes the token files, checkpoints and the model. The clean corpus, the tokenizer and OUTPUT must
# be on a file system every node mounts; a run killed part-way resumes from the last checkpoint.
#
#   NODES=2 NODE_RANK=0 MASTER=gpu-node-0 docs/deploy/pretrain-multinode.sh /shared/kiln/work/300m   # on node 0
#   NODES=2 NODE_RANK=1 MASTER=gpu-node-0 docs/deploy/pretrain-multinode.sh /shared/kiln/work/300m   # on node 1
set -euo pipefail
WORK="${1:?the profile's work folder, e.g. /shared/kiln/work/300m}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-eth0}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec .venv/bin/torchrun \
  --nnodes "${NODES:?}" --node-rank "${NODE_RANK:?}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER:?}:29500" --rdzv-id "kiln-${RUN_ID:-pretrain}" \
  -m pipeline.cli pretrain --profile "${PROFILE:-300m}" \
  --clean "$WORK/clean_corpus" --tokenizer "$WORK/tokenizer/tokenizer" --output "$WORK/base_model"
