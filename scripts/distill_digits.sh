#!/usr/bin/env bash
# Distillation on the embedded DIGITS data, on a CPU in a few minutes: a DHVT teacher, then the same small
# distilled DeiT student trained twice for the same epochs, with hard distillation and without a teacher.
#
#   scripts/distill_digits.sh [OUTPUT_DIR [SEED]]      (default runs/distill_digits, seed 0)
#
# Hardware: a 2-core CPU. What it printed for seeds 0-2 (OMP_NUM_THREADS=2) is in docs/deit.md.
set -euo pipefail
OUT=${1:-runs/distill_digits}
SEED=${2:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAIN=$ROOT/main.py
PYTHON=${PYTHON:-python}
COMMON=(-c "$ROOT/configs/digits_dhvt.yaml" --seed "$SEED")  # the quick start's recipe; the students change --model
STUDENT=deit_tiny_distilled_patch4_32

"$PYTHON" "$MAIN" "${COMMON[@]}" --model dhvt_digits_patch4_16 --output_dir "$OUT/teacher"
"$PYTHON" "$MAIN" "${COMMON[@]}" --model "$STUDENT" --output_dir "$OUT/student_alone"
"$PYTHON" "$MAIN" "${COMMON[@]}" --model "$STUDENT" --distillation-type hard --teacher-model dhvt_digits_patch4_16 \
    --teacher-path "$OUT/teacher/checkpoint.pth" --output_dir "$OUT/student_distilled"

"$PYTHON" - "$OUT" <<'PY'
import json, os, sys
for run in ('teacher', 'student_alone', 'student_distilled'):
    with open(os.path.join(sys.argv[1], run, 'log.txt')) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    print(f'{run:18s} final top-1 {last["test_acc1"]:.2f}%  (best {last["max_accuracy"]:.2f}%)')
PY
