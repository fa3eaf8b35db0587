#!/usr/bin/env bash
# Every figure only a GPU can give, in one command: one JSON line each (step, feed, parity, budget; see
# scripts/gpu_check.py). Under 8 minutes on one GPU with 16 cores; no internet or package index needed.
#   bash scripts/gpu_check.sh            on the GPU machine
#   bash scripts/gpu_check.sh --tiny     the same checks on the CPU with a test-size model
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
