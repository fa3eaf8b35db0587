#!/usr/bin/env bash
# Launches configs/dhvt_tiny_cifar100.yaml, whose header gives the paper's command, hardware and accuracy, on the
# paper's 2 GPU(s) with 512 images per update in all.
#
# Usage: scripts/dhvt_tiny_cifar100.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/cifar100
PAPER_NPROC=2
source "$(dirname "$0")/_recipe.sh"

launch 512 -c "$CONFIGS/dhvt_tiny_cifar100.yaml" --data-path "$DATA_PATH"
