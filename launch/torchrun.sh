#!/bin/bash
# Single- or multi-node launch without SLURM.
#   launch/torchrun.sh --nproc-per-node 8 -- train examples/tiny_recipe.yaml        # one node
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr host0 --nproc-per-node 8 -- train CFG
# Add --dry-run to print the exact torchrun command instead of running it.
set -euo pipefail
exec megatron-rcm launch "$@"
