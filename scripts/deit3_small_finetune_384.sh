#!/usr/bin/env bash
# Launches configs/deit3_small_finetune_384.yaml, whose header gives the paper's command, hardware and accuracy, on the
# paper's 8 GPU(s) with 512 images per update in all.
#
# Usage: scripts/deit3_small_finetune_384.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=8
source "$(dirname "$0")/_recipe.sh"

FINETUNE=${FINETUNE:-runs/deit3_small_imagenet/checkpoint.pth}  # the 224 px run of scripts/deit3_small_imagenet.sh
if [[ "${LOCAL:-0}" == 1 && ! -e "$FINETUNE" ]]; then
    echo "LOCAL=1: a random deit3_small_patch16_224 stands in for $FINETUNE"
    FINETUNE=$(random_weights deit3_small_patch16_224)
fi
launch 512 -c "$CONFIGS/deit3_small_finetune_384.yaml" --data-path "$DATA_PATH" --finetune "$FINETUNE"
