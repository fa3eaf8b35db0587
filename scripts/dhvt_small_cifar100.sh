#!/usr/bin/env bash
# DHVT-S, patch 4 (dhvt_small_patch4_32) on CIFAR-100 from scratch, 300 epochs: "Bridging the Gap Between Vision
# Transformers and Convolutional Neural Networks on Small Datasets" (Lu et al., NeurIPS 2022).
#
# Command (DHVT's run_code_cifar.sh, written for the tiny model, with dhvt_small_cifar_patch4 and the
# paper's batch of 256 for the small one):
#   torchrun --nproc_per_node=2 main.py --model dhvt_small_cifar_patch4 --input-size 32 --batch-size 128 \
#       --warmup-epochs 5 --lr 1e-3 --num_workers 8 --epochs 300 --dist-eval --data-set CIFAR \
#       --data-path ./data/cifar-100-python --output_dir ./output/cifar/$now
# Hardware: one node with 2 GPUs (the GPU model is not stated); 128 images per GPU, a global batch of 256, so
#   --lr 1e-3 (per 512 images) scales to 5e-4.
# Expected: 82.91% top-1 on CIFAR-100 test (DHVT paper; 23.4M params, 1.5 GFLOPs).
#
# Usage: scripts/dhvt_small_cifar100.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/cifar100
PAPER_NPROC=2
source "$(dirname "$0")/_recipe.sh"

# DHVT keeps DeiT's augmentation at 32 px, written out here: RandAugment, mixup 0.8, cutmix 1.0, random erasing
# 0.25, label smoothing 0.1, repeated augmentation, drop path 0.1, EMA; a padded random crop replaces the
# random-resized crop (our small-image pipeline does that at 32 px). Weight decay 0.05. The cosine spans all
# 300 epochs, as in DHVT's loop. --download fetches CIFAR-100 when it is missing.
launch 256 --model dhvt_small_patch4_32 --data-set CIFAR100 --data-path "$DATA_PATH" --download --input-size 32 \
    --epochs 300 --warmup-epochs 5 --lr 1e-3 --weight-decay 0.05 \
    --aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --smoothing 0.1 --repeated-aug \
    --drop-path 0.1 --model-ema --num_workers 8 --dist-eval
