#!/usr/bin/env bash
# Writes the first COUNT held-out handwritten digits (the DIGITS validation split main.py evaluates on) as 8 x 8
# grey PNG files named INDEX_LABEL.png, the images docs/tools.md gives its tools.
#
# Usage: scripts/digits_images.sh [DIR [COUNT]]     (default: digits 8)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"${PYTHON:-python}" - "$ROOT" "${1:-digits}" "${2:-8}" <<'PY'
import os
import sys

from PIL import Image

sys.path.insert(0, sys.argv[1])
from datasets import digits_split  # noqa: E402

folder, count = sys.argv[2], int(sys.argv[3])
images, labels = digits_split(is_train=False)
os.makedirs(folder, exist_ok=True)
for index, (pixels, label) in enumerate(zip(images[:count], labels[:count])):
    Image.fromarray(pixels).save(os.path.join(folder, f'{index:03d}_{label}.png'))
print(f'wrote {len(images[:count])} held-out digits to {folder}/ as INDEX_LABEL.png')
PY
