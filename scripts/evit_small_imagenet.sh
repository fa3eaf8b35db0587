#!/usr/bin/env bash
# Launches configs/evit_small_imagenet.yaml, whose header gives the paper's command, hardware and accuracy, on the
# paper's 8 GPU(s) with 1024 images per update in all.
#
# Usage: scripts/evit_small_imagenet.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=8
source "$(dirname "$0")/_recipe.sh"

launch 1024 -c "$CONFIGS/evit_small_imagenet.yaml" --data-path "$DATA_PATH"
