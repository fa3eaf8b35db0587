#!/usr/bin/env bash
# Launches configs/deit3_small_finetune_384.yaml, whose header gives the paper's command, hardware and accuracy, on the
# paper's 8 GPU(s) with 512 images per update in all.
#
# Usage: scripts/deit3_small_finetune_384.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=8
source "$(dirname "$0")/_recipe.sh"

launch 512 -c "$CONFIGS/deit3_small_finetune_384.yaml" --data-path "$DATA_PATH" \
    --finetune "${FINETUNE:-runs/deit3_small_imagenet/checkpoint.pth}"
