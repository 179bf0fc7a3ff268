#!/usr/bin/env bash
# One machine, N GPUs (or N CPU processes with gloo): DistributedDataParallel via torchrun.
#   bash experiments/launch/torchrun_1node.sh 4 synapse_glam_nnformer --data data/synapse_pre
# CONFIG is a shipped config's name (`glam3d configs`) or a YAML file; the rest are glam3d train options.
# data.batch_size is per GPU: 4 GPUs x batch 2 = 8 patches per step (scale optim.lr or train.iters_per_epoch to
# taste; the official schedule is 1 GPU x batch 2).
set -euo pipefail
NPROC=${1:?usage: torchrun_1node.sh NPROC CONFIG [glam3d train options]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m glam3d train "$@"
