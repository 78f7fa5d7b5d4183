#!/usr/bin/env bash
# Example: stage-1 pre-training of the base model on 2 nodes x 8 GPUs with the deepspeed launcher.
# HOSTFILE lists the nodes, one "hostname slots=8" a line; every node needs the same checkout and data paths.
# Usage: HOSTFILE=hosts OUT=runs/base bash scripts/launch_multinode.sh [extra key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile}"
OUT=${OUT:-runs/base}
exec deepspeed --hostfile "$HOSTFILE" --num_nodes "${NODES:-2}" --num_gpus "${GPUS_PER_NODE:-8}" \
    --module x2vlm pretrain --config "${CONFIG:-base}" \
    "train.out_dir=$OUT" train.ds_config=zero2_bf16.json "$@"
