#!/usr/bin/env bash
# DeiT-S (deit_small_patch16_224) on ImageNet-1k from scratch, 300 epochs: "Training data-efficient image
# transformers & distillation through attention" (Touvron et al., 2021).
#
# Command (DeiT's README; torchrun stands for `python -m torch.distributed.launch --use_env`):
#   torchrun --nproc_per_node=4 main.py --model deit_small_patch16_224 --batch-size 256 \
#       --data-path /path/to/imagenet --output_dir /path/to/save
# Hardware: one node with 4 GPUs (V100s in the paper: under 3 days); 256 images per GPU, a global batch
#   of 1024, so --lr 5e-4 (per 512 images) scales to 1e-3.
# Expected: 79.9% top-1 on ImageNet-1k val (DeiT paper; timm's deit_small_patch16_224.fb_in1k: 79.85%).
#
# Usage: scripts/deit_small_imagenet.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=4
source "$(dirname "$0")/_recipe.sh"

# DeiT's defaults are ours (AdamW, lr 5e-4, wd 0.05, warm-up 5, RandAugment, mixup 0.8, cutmix 1.0, erasing
# 0.25, repeated augmentation, drop path 0.1, EMA). The cosine spans all 300
# epochs, as DeiT's loop stops before timm's cool-down.
launch 1024 --model deit_small_patch16_224 --data-path "$DATA_PATH" --epochs 300
