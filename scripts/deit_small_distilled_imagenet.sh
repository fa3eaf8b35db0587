#!/usr/bin/env bash
# Launches configs/deit_small_distilled_imagenet.yaml, whose header gives the paper's command, hardware and accuracy, on the
# paper's 4 GPU(s) with 1024 images per update in all.
#
# Usage: scripts/deit_small_distilled_imagenet.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=4
source "$(dirname "$0")/_recipe.sh"

TEACHER=(${TEACHER_PATH:+--teacher-path "$TEACHER_PATH"})  # default: the recipe's URL, downloaded once
if [[ "${LOCAL:-0}" == 1 && -z "${TEACHER_PATH:-}" ]]; then
    echo "LOCAL=1: a random regnety_002 stands in for the recipe's teacher (TEACHER_PATH=FILE for a real one)"
    TEACHER=(--teacher-model regnety_002 --teacher-path "$(random_weights regnety_002)")
fi
launch 1024 -c "$CONFIGS/deit_small_distilled_imagenet.yaml" --data-path "$DATA_PATH" "${TEACHER[@]}"
