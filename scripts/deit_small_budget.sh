#!/usr/bin/env bash
# DeiT-S on ImageNet-1k to a fixed wall-clock budget (default 24 hours) on however many GPUs this node has:
# DeiT's recipe, with the LR and a growing resolution planned for the deadline instead of for 300 epochs.
#
# Command:
#   torchrun --nproc_per_node=8 main.py --model deit_small_patch16_224 --data-path /path/to/imagenet \
#       --time-budget 24 --size-schedule 0:128,0.5:160,0.8:224 --eval-on-final-size --multisize-batch
# Hardware: one node with NPROC GPUs (default 8), global batch 1024 at 224 px (more at the smaller sizes).
# Expected: DeiT-S reaches 79.9% top-1 in 300 epochs (DeiT); under a budget, what the budget buys (not
#   measured here).
#
# Usage: BUDGET_HOURS=12 scripts/deit_small_budget.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=8
source "$(dirname "$0")/_recipe.sh"

launch 1024 --model deit_small_patch16_224 --data-path "$DATA_PATH" --time-budget "${BUDGET_HOURS:-24}" \
    --size-schedule 0:128,0.5:160,0.8:224 --eval-on-final-size --multisize-batch
