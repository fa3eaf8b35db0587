#!/usr/bin/env bash
# LocalViT-S (localvit_small_patch16_224) on ImageNet-1k from scratch, 300 epochs: "LocalViT: Bringing Locality
# to Vision Transformers" (Li et al.), depth-wise convolutions in the feed-forward network.
#
# Command (LocalViT's README gives it for LocalViT-T; LocalViT-S swaps the model, localvit_small there):
#   torchrun --nproc_per_node=8 main.py --model localvit_small --batch-size 128 \
#       --data-path /path/to/imagenet --output_dir /path/to/save
# Hardware: one node with 8 GPUs; 128 images per GPU, a global batch of 1024 (--lr 5e-4 scales to 1e-3).
# Expected: 80.8% top-1 on ImageNet-1k val (LocalViT's released localvit_s.pth: 80.78%).
#
# Usage: scripts/localvit_small_imagenet.sh [DATA_PATH [OUTPUT_DIR [more main.py flags]]]; see scripts/_recipe.sh.
set -euo pipefail
DEFAULT_DATA_PATH=data/imagenet
PAPER_NPROC=8
source "$(dirname "$0")/_recipe.sh"

# LocalViT trains with DeiT's code and defaults, which are ours; its epoch loop also ends before timm's
# cooldown, so the cosine spans all 300 epochs.
launch 1024 --model localvit_small_patch16_224 --data-path "$DATA_PATH" --epochs 300
