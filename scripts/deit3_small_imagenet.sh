#!/usr/bin/env bash
# DeiT III ViT-S (deit3_small_patch16_224) on ImageNet-1k from scratch, 800 epochs: "DeiT III: Revenge of the
# ViT" (Touvron, Cord and Jegou, 2022).
#
# Command (DeiT's README_revenge.md; deit_small_patch16_LS there is timm's deit3_small_patch16_224):
#   python run_with_submitit.py --model deit_small_patch16_LS --data-path /path/to/imagenet --batch 256 \
#       --lr 4e-3 --epochs 800 --weight-decay 0.05 --sched cosine --input-size 224 --reprob 0.0 --node 1 \
#       --gpu 8 --smoothing 0.0 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb \
#       --warmup-lr 1e-6 --mixup .8 --drop-path 0.05 --cutmix 1.0 --unscale-lr --repeated-aug --bce-loss \
#       --color-jitter 0.3 --ThreeAugment
#   (here: torchrun ... main.py --model deit3_small_patch16_224 with the same flags)
# Hardware: one node with 8 GPUs; 256 images per GPU, a global batch of 2048, --lr 4e-3 unscaled.
# Expected: 81.4% top-1 on ImageNet-1k val (DeiT III's model zoo, ViT-S at 224 px).
#
# Usage: scripts/deit3_small_imagenet.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=8
source "$(dirname "$0")/_recipe.sh"

# DeiT III's recipe: LAMB (timm's, in place of apex's fusedlamb), binary cross-entropy, 3-Augment, no random
# erasing or label smoothing, LayerScale starting at 1e-4 and the same drop-path rate in every block, as in
# DeiT's models_v2.py. The LR is the global one (--unscale-lr); the cosine spans all epochs, as in DeiT.
launch 2048 --model deit3_small_patch16_224 --data-path "$DATA_PATH" --lr 4e-3 --unscale-lr --epochs 800 \
    --weight-decay 0.05 --sched cosine --input-size 224 --reprob 0.0 --smoothing 0.0 \
    --warmup-epochs 5 --warmup-lr 1e-6 --drop 0.0 --opt lamb --mixup 0.8 --cutmix 1.0 --drop-path 0.05 \
    --constant-drop-path --layer-scale 1e-4 --repeated-aug --bce-loss --color-jitter 0.3 --ThreeAugment
