#!/usr/bin/env bash
# Launches configs/vit_24h_1gpu.yaml, whose header gives the paper's command, hardware and accuracy, on the
# paper's 1 GPU(s) with 64 images per update in all.
#
# Usage: scripts/vit_24h_1gpu.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=1
source "$(dirname "$0")/_recipe.sh"

launch 64 -c "$CONFIGS/vit_24h_1gpu.yaml" --data-path "$DATA_PATH"
