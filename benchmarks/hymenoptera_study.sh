#!/usr/bin/env bash
# The README's measured answer on real photos: hymenoptera (ants vs bees), 4 strategies x 3 seeds x a small
# lr grid, each strategy compared at the lr that won on validation (the tuned comparison).
# Usage: benchmarks/hymenoptera_study.sh [DATA] [STORE]   (about 15 min on an idle 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/hymenoptera}
STORE=${2:-sqlite:///$(pwd)/hymenoptera_study.db}
export MLFLOW_TRACKING_URI=$STORE
BIN=${BIN:-.venv/bin}
time $BIN/tlexp sweep --data "$DATA" --experiment hymenoptera-study \
    --strategies scratch,transfer,finetune,lpft --seeds 0,1,2 --samples-per-class all \
    --lrs 3e-4,3e-3 --epochs 5 --lp-epochs 2 --image-size 96 --quiet
time $BIN/tlexp compare --experiment hymenoptera-study --output reports/hymenoptera-study
