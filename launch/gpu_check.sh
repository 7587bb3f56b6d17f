#!/usr/bin/env bash
# `make gpu-check` (docs/gpu.md): prove a machine with one NVIDIA GPU in one command, <= 8 min.
#
# Runs with the machine's own python3 and its CUDA PyTorch, not ./.venv. What capsdist needs
# beyond such an image (DeepSpeed, OmegaConf, ...) comes as wheels from `make gpu-wheels`, in
# .gpu_carry/wheels: pip installs them offline (--no-index) under a prefix of their own, so the
# machine's packages stay untouched, torch included (pip finds it installed and keeps it).
# Then capsdist/bench/gpu_check.py runs the stages and writes gpu_check.json and gpu_check.md
# to $OUT (else runs/gpu_check). Arguments are passed on (--out, --data, --work).
#
# Settings (environment):
#   GPU_PYTHON     the interpreter (default python3)
#   GPU_CARRY      the folder from `make gpu-wheels` (default .gpu_carry)
#   GPU_SITE       where the wheels are installed (default /tmp/capsdist-gpu-site)
#   GPU_CHECK_DRY  1: the same stages on the CPU with tiny sizes (CI runs this; there is no
#                  $GPU_CARRY there, so nothing is installed)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${GPU_PYTHON:-python3}
CARRY=${GPU_CARRY:-.gpu_carry}
SITE=${GPU_SITE:-/tmp/capsdist-gpu-site}
DATA_ARGS=()
[[ -d $CARRY/fashion-mnist ]] && DATA_ARGS=(--data "$CARRY/fashion-mnist")

if [[ ! -f $CARRY/wheels/requirements.txt && ${GPU_CHECK_DRY:-0} != 1 ]]; then
  echo "gpu-check: no $CARRY/wheels: run \`make gpu-wheels\` where pip reaches an index, and" \
    "carry $CARRY to this machine (docs/gpu.md)" >&2
  exit 2
fi
if [[ -f $CARRY/wheels/requirements.txt ]]; then
  "$PY" -m pip install --quiet --no-index --find-links "$CARRY/wheels" --prefix "$SITE" \
    --no-warn-script-location --disable-pip-version-check -r "$CARRY/wheels/requirements.txt"
  # pure and platform libraries may land in lib/ and lib64/: put every site-packages first
  for dir in $(find "$SITE" -type d -name site-packages); do
    PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
  done
  export PYTHONPATH
fi

exec "$PY" -m capsdist.bench.gpu_check "${DATA_ARGS[@]}" "$@"
