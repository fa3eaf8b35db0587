#!/usr/bin/env bash
# DeiT-S distilled from a RegNetY-16GF teacher (hard distillation through the distillation token) on
# ImageNet-1k, 300 epochs: "Training data-efficient image transformers & distillation through attention".
#
# Command (DeiT's README):
#   python run_with_submitit.py --model deit_small_distilled_patch16_224 --teacher-model regnety_160 \
#       --teacher-path https://dl.fbaipublicfiles.com/deit/regnety_160-a5fbbb8b.pth --distillation-type hard \
#       --data-path /path/to/imagenet --output_dir /path/to/save   (DeiT's main.py --model ... with torchrun alike)
# Hardware: one node with 4 GPUs, 256 images per GPU (global batch 1024, --lr 5e-4 scales to 1e-3).
# Expected: 81.2% top-1 on ImageNet-1k val (DeiT paper, DeiT-S with the distillation token, 300 epochs).
#
# The teacher's weights are downloaded once (weights_only) or read from TEACHER_PATH if set.
# Usage: scripts/deit_small_distilled_imagenet.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=4
source "$(dirname "$0")/_recipe.sh"

launch 1024 --model deit_small_distilled_patch16_224 --data-path "$DATA_PATH" --epochs 300 \
    --teacher-model regnety_160 --distillation-type hard \
    --teacher-path "${TEACHER_PATH:-https://dl.fbaipublicfiles.com/deit/regnety_160-a5fbbb8b.pth}"
