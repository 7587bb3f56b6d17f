#!/usr/bin/env bash
# Start `capsdist train` with the launcher named by LAUNCHER; every setting from the environment
# (`make launch` passes them through). No training logic here: every launcher runs the same loop.
#
#   CONFIG       config YAML (required)
#   ARGS         key=value overrides, split as a shell would: quote values with spaces,
#                e.g. ARGS="run.dir='runs/my run' train.lr=0.01"
#   LAUNCHER     torchrun (default) | deepspeed | slurm | ray
#   NPROC        processes per node (default: GPUs on this node, else 1)
#   NNODES       nodes (default 1)                           NODE_RANK    this node (default 0)
#   MASTER_ADDR  node 0's address (default 127.0.0.1)        MASTER_PORT  (default 29500)
#   HOSTFILE     DeepSpeed hostfile (LAUNCHER=deepspeed, multi-node)
#   MAX_RESTARTS torchrun restarts of failed workers (default 3)
#   RDZV_WAIT_S  how long a node > 0 waits for node 0 to answer (default 60)
#   LAUNCHER=slurm also reads GPUS_PER_NODE, CPUS_PER_TASK, PARTITION, TIME_LIMIT, STOP_NOTICE_S,
#                JOB_LOG, WAIT (see launch/slurm_submit.sh)
#   RAY_ADDRESS  LAUNCHER=ray: the running Ray cluster to submit to (required when NNODES > 1)
# On a machine without a GPU every launcher runs CPU processes with gloo. The config is loaded
# once before any launcher starts: a bad key or value fails here, with exit 2, instead of in
# every one of torchrun's MAX_RESTARTS restarts.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "launch: error: $*" >&2; exit 2; }

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || die "no $PY: run 'make install' first"
[ -n "${CONFIG:-}" ] || die "CONFIG is not set (e.g. CONFIG=configs/debug_cpu.yaml)"
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG does not exist"

LAUNCHER=${LAUNCHER:-torchrun}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_WAIT_S=${RDZV_WAIT_S:-60}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}

for name in NNODES NODE_RANK MASTER_PORT NPROC MAX_RESTARTS RDZV_WAIT_S; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name=${!name} is not a whole number"
done
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
# LAUNCHER=ray: several nodes means a running Ray cluster. Without its address Ray would start on
# this machine alone and wait forever for NNODES x NPROC workers.
if [ "$LAUNCHER" = ray ] && (( NNODES > 1 )) && [ -z "${RAY_ADDRESS:-}" ]; then
  die "LAUNCHER=ray with NNODES=$NNODES needs RAY_ADDRESS, the running cluster's head (e.g.\
 RAY_ADDRESS=10.0.0.1:6379 after 'ray start --head' there; see docs/launch.md)"
fi
# Split ARGS with shlex (as a shell would) and load the config with them, exactly as
# `capsdist train` will; print the overrides shell-quoted, for the `eval` below.
QUOTED=$("$PY" - "$CONFIG" "${ARGS:-}" <<'EOF'
import shlex
import sys

from capsdist.cli import build_parser, config_from_args
from capsdist.errors import UserError


def fail(message):
    print(f"launch: error: {message}", file=sys.stderr)
    sys.exit(2)


config, args = sys.argv[1:]
try:
    overrides = shlex.split(args)
except ValueError as err:  # an unclosed quote
    fail(f"ARGS: {err}")
try:
    config_from_args(build_parser().parse_args(["train", "-c", config, *overrides]))
except UserError as err:
    fail(err)
print(shlex.join(overrides))
EOF
) || exit $?
eval "OVERRIDES=($QUOTED)"  # safe: shlex.join quotes every word for a POSIX shell

# (Not for LAUNCHER=slurm: the job runs on other machines; launch/slurm.sbatch decides there.)
if (( GPUS == 0 )) && [ "$LAUNCHER" != slurm ]; then
  export DS_ACCELERATOR=cpu
  # One thread per rank, or the ranks fight over the cores (2.5x slower measured).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi

# A node other than 0 must reach node 0 before it starts: fail with a clear message instead of
# hanging in the rendezvous for many minutes.
check_master() {
  local deadline=$(( SECONDS + RDZV_WAIT_S ))
  until timeout 2 bash -c "exec 3<>/dev/tcp/$MASTER_ADDR/$MASTER_PORT" 2> /dev/null; do
    (( SECONDS < deadline )) || die "cannot reach MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT\
 within ${RDZV_WAIT_S}s: start node 0 first, and check the address, port and firewall"
    sleep 1
  done
}
if (( NNODES > 1 )); then
  getent hosts "$MASTER_ADDR" > /dev/null || die "MASTER_ADDR=$MASTER_ADDR does not resolve"
  (( NODE_RANK == 0 )) || [ "$LAUNCHER" != torchrun ] || check_master
fi

TRAIN=(-m capsdist train -c "$CONFIG" "${OVERRIDES[@]}")
case "$LAUNCHER" in
  torchrun)
    # c10d rendezvous (not the static master_addr one): every restart round gets fresh store
    # keys, so workers restarted after a crash do not read their dead peers' stale addresses.
    exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
      --nproc_per_node "$NPROC" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
      --rdzv_id "${RDZV_ID:-capsdist}" --max_restarts "$MAX_RESTARTS" "${TRAIN[@]}" ;;
  deepspeed)
    HOSTS=()
    [ -z "${HOSTFILE:-}" ] || { [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist"; HOSTS=(--hostfile "$HOSTFILE"); }
    exec "$VENV/bin/deepspeed" "${HOSTS[@]}" --num_nodes "$NNODES" --num_gpus "$NPROC" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module "${TRAIN[@]:1}" ;;
  slurm)
    # sbatch options, the log, WAIT: launch/slurm_submit.sh; the job itself: launch/slurm.sbatch.
    # The overrides travel as the batch script's arguments, word for word (SLURM keeps them for
    # a requeued job). MASTER_ADDR/MASTER_PORT: the job picks its own (a MASTER_PORT in the
    # environment is kept).
    NNODES=$NNODES NPROC=$NPROC GPUS_HERE=$GPUS VENV=$VENV \
      exec bash launch/slurm_submit.sh -c "$CONFIG" "${OVERRIDES[@]}" ;;
  ray)
    # One Ray Train worker per process: NNODES x NPROC in all, placed by ray.placement_strategy.
    exec "$PY" launch/ray_train.py --num-workers $(( NNODES * NPROC )) -c "$CONFIG" "${OVERRIDES[@]}" ;;
  *) die "LAUNCHER=$LAUNCHER: use torchrun, deepspeed, slurm or ray" ;;
esac
