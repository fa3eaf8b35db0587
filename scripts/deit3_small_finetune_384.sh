#!/usr/bin/env bash
# DeiT III ViT-S fine-tuned at 384 px (deit3_small_patch16_384) from the 224 px run of
# scripts/deit3_small_imagenet.sh, 20 epochs: "DeiT III: Revenge of the ViT" (Touvron, Cord and Jegou, 2022).
#
# Command (DeiT's README_revenge.md, "finetuning for ViT-S at resolution 384x384"):
#   python run_with_submitit.py --model deit_small_patch16_LS --data-path /path/to/imagenet --batch 64 \
#       --lr 1e-5 --epochs 20 --weight-decay 0.1 --sched cosine --input-size 384 --reprob 0.0 --node 1 --gpu 8 \
#       --smoothing 0.1 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt adamw --warmup-lr 1e-6 \
#       --mixup .8 --drop-path 0.0 --cutmix 1.0 --unscale-lr --no-repeated-aug --color-jitter 0.3 \
#       --aa rand-m9-mstd0.5-inc1 --finetune model_path
#   (here: torchrun ... main.py --model deit3_small_patch16_384 with the same flags)
# Hardware: one node with 8 GPUs; 64 images per GPU, a global batch of 512, --lr 1e-5 unscaled.
# Expected: 83.4% top-1 on ImageNet-1k val (DeiT III's model zoo, ViT-S at 384 px).
#
# Usage: FINETUNE=runs/deit3_small_imagenet/checkpoint.pth scripts/deit3_small_finetune_384.sh [DATA_PATH
#   [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh. The position embedding of the 224 px checkpoint
#   is interpolated to the 24 x 24 grid.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=8
source "$(dirname "$0")/_recipe.sh"

launch 512 --model deit3_small_patch16_384 --finetune "${FINETUNE:-runs/deit3_small_imagenet/checkpoint.pth}" \
    --data-path "$DATA_PATH" --input-size 384 --lr 1e-5 --unscale-lr --epochs 20 \
    --weight-decay 0.1 --sched cosine --reprob 0.0 --smoothing 0.1 --warmup-epochs 5 --warmup-lr 1e-6 \
    --drop 0.0 --opt adamw --mixup 0.8 --cutmix 1.0 --drop-path 0.0 --no-repeated-aug --color-jitter 0.3 \
    --aa rand-m9-mstd0.5-inc1
