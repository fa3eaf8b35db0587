# Shared by the recipes (sourced, not run): reads the data path and output dir, then `launch GLOBAL_BATCH FLAGS`
# (FLAGS: -c "$CONFIGS/recipe.yaml" and what the launcher adds)
# runs main.py on NPROC processes with GLOBAL_BATCH / NPROC images each, so the global batch (and the scaled
# learning rate) stays the paper's on any number of GPUs.
#
#   recipe.sh [DATA_PATH [OUTPUT_DIR [more main.py flags ...]]]     (or DATA_PATH=... OUTPUT_DIR=... recipe.sh)
#   NPROC=8 recipe.sh ...      processes (GPUs) on this node; default: the paper's
#   LOCAL=1 recipe.sh          one CPU epoch of the same recipe on 64 fake 32 px images: checks that it starts
#                              (a budget recipe gets --time-budget 0.005, 18 s, in place of its own; weights it
#                              would download or take from an earlier run are random ones made on the spot)

DATA_PATH=${1:-${DATA_PATH:-$DEFAULT_DATA_PATH}}
OUTPUT_DIR=${2:-${OUTPUT_DIR:-runs/$(basename "$0" .sh)}}
EXTRA_FLAGS=("${@:3}")
NPROC=${NPROC:-$PAPER_NPROC}
MAIN=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/main.py
CONFIGS=$(cd "$(dirname "${BASH_SOURCE[0]}")/../configs" && pwd)

if [[ "${LOCAL:-0}" == 1 ]]; then
    STANDINS=$(mktemp -d)
    trap 'rm -rf "$STANDINS"' EXIT
fi

random_weights() {  # MODEL: prints the path of a temporary file holding MODEL's random initial weights (LOCAL=1)
    "${PYTHON:-python}" - "$(dirname "$MAIN")" "$1" "$STANDINS/$1.pth" <<'PY'
import sys
import timm
import torch
sys.path.insert(0, sys.argv[1])
import models  # noqa: F401,E402 - registers this repository's families
torch.save(timm.create_model(sys.argv[2]).state_dict(), sys.argv[3])
PY
    echo "$STANDINS/$1.pth"
}

recipe_file() {  # the FILE of "-c FILE" among the arguments
    while (( $# > 1 )); do
        [[ "$1" == -c ]] && { echo "$2"; return; }
        shift
    done
}

launch() {
    local global_batch=$1
    shift
    if [[ "${LOCAL:-0}" == 1 ]]; then  # later flags win in argparse: shrink the run, keep the recipe
        local budget=()
        if grep -q '^time_budget:' "$(recipe_file "$@")"; then
            echo "LOCAL=1: --time-budget 0.005 (18 s) in place of the recipe's budget"
            budget=(--time-budget 0.005)
        fi
        "${PYTHON:-python}" "$MAIN" "$@" "${EXTRA_FLAGS[@]}" --data-set FAKE --fake-size 64 --batch-size 16 \
            --input-size 32 --epochs 1 --warmup-epochs 0 --device cpu --num_workers 0 "${budget[@]}" \
            --output_dir ''
        return
    fi
    if (( global_batch % NPROC != 0 )); then
        echo "error: NPROC=$NPROC does not divide the global batch $global_batch; choose a divisor" >&2
        exit 2
    fi
    echo "output dir: $OUTPUT_DIR"
    # scripts/torchrun.py is torchrun that leaves Ctrl-C / SIGTERM to the workers (one line, exit 0); TORCHRUN=torchrun
    # for the plain one
    local launcher=("${PYTHON:-python}" "$(dirname "$MAIN")/scripts/torchrun.py")
    [[ -n "${TORCHRUN:-}" ]] && launcher=("$TORCHRUN")
    "${launcher[@]}" --nproc_per_node="$NPROC" "$MAIN" "$@" --batch-size $((global_batch / NPROC)) \
        --output_dir "$OUTPUT_DIR" "${EXTRA_FLAGS[@]}"
}
