#!/usr/bin/env bash
# The 24-hour recipe shrunk to a CPU and one minute: DHVT on the embedded DIGITS data with a 60-second budget,
# next to the same run planned for 25 epochs and simply stopped at 60 seconds (the paper's way).
#
#   scripts/vit_budget_digits_cpu.sh [OUTPUT_DIR [SEED]]        (default runs/budget_digits, seed 0)
#
# Hardware: a 2-core CPU. The figures it printed are in docs/budget.md.
set -euo pipefail
OUT=${1:-runs/budget_digits}
SEED=${2:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAIN=$ROOT/main.py
PYTHON=${PYTHON:-python}
COMMON=(-c "$ROOT/configs/digits_dhvt.yaml" --epochs 25 --seed "$SEED")  # the quick start's recipe, 25 epochs

"$PYTHON" "$MAIN" "${COMMON[@]}" --time-budget 0.0166667 --output_dir "$OUT/budget"
# The epoch-based run is stopped by SIGTERM at 60 s: it checkpoints and exits; its log has the epochs it finished.
timeout --signal=TERM 60 "$PYTHON" "$MAIN" "${COMMON[@]}" --output_dir "$OUT/stopped" || true

"$PYTHON" - "$OUT" <<'PY'
import json, os, sys
for run in ('budget', 'stopped'):
    with open(os.path.join(sys.argv[1], run, 'log.txt')) as f:
        epochs = [e for e in map(json.loads, filter(str.strip, f)) if 'config' not in e]
    last = epochs[-1]
    print(f'{run:8s} top-1 at the deadline {last["test_acc1"]:.2f}% after {last["elapsed_seconds"]:.1f} s '
          f'({len(epochs)} evaluations)')
PY
