#!/usr/bin/env bash
# `LAUNCHER=slurm make launch`: submit launch/slurm.sbatch with sbatch and, with WAIT=1, wait for
# the job and exit with its exit code. Called by launch/launch.sh, which has already checked
# CONFIG and ARGS: its arguments are `capsdist train`'s (-c CONFIG key=value ...), passed to the
# job word for word. Settings from the environment:
#   NNODES, NPROC     nodes, and tasks (processes) per node                      (from launch.sh)
#   GPUS_PER_NODE     GPUs per node (--gpus-per-node); default: the GPUs of this machine, so on a
#                     login node without GPUs set it (0 = a CPU job)
#   CPUS_PER_TASK     --cpus-per-task (default: the cluster's)
#   PARTITION         --partition (default: the cluster's)
#   TIME_LIMIT        --time, e.g. 24:00:00 (default: the partition's)
#   STOP_NOTICE_S     seconds before the time limit at which the job stops at a checkpoint and
#                     requeues itself (--signal=B:USR1@N; default 180, from slurm.sbatch)
#   JOB_LOG           the job's log (stdout and stderr; default runs/slurm/capsdist-%j.out, %j =
#                     job id); appended to, so a requeued job's log follows the first one
#   WAIT              1: wait for the job and exit with its exit code
#   WAIT_POLL_S       how often WAIT asks slurmctld for the job's state (default 5)
set -euo pipefail

die() { echo "launch: error: $*" >&2; exit 2; }

command -v sbatch > /dev/null || die "LAUNCHER=slurm needs sbatch (run this on a SLURM login node)"
NNODES=${NNODES:-1}
NPROC=${NPROC:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${GPUS_HERE:-0}}
JOB_LOG=${JOB_LOG:-runs/slurm/capsdist-%j.out}
WAIT=${WAIT:-0}
WAIT_POLL_S=${WAIT_POLL_S:-5}
for name in NNODES NPROC GPUS_PER_NODE WAIT_POLL_S ${CPUS_PER_TASK:+CPUS_PER_TASK} \
  ${STOP_NOTICE_S:+STOP_NOTICE_S}; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name=${!name} is not a whole number"
done
(( NNODES > 0 && NPROC > 0 )) || die "NNODES and NPROC must be at least 1"
[[ "$WAIT" =~ ^[01]$ ]] || die "WAIT=$WAIT: use 1 (wait for the job) or 0"
(( GPUS_PER_NODE == 0 || NPROC <= GPUS_PER_NODE )) \
  || die "NPROC=$NPROC tasks per node but GPUS_PER_NODE=$GPUS_PER_NODE: at most one task per GPU"
log_dir=$(dirname "$JOB_LOG")
[[ "$log_dir" != *%* ]] || die "JOB_LOG=$JOB_LOG: put %j and other patterns in the file name only"

OPTS=(--parsable --nodes "$NNODES" --ntasks-per-node "$NPROC" --output "$JOB_LOG" --open-mode append)
(( GPUS_PER_NODE == 0 )) || OPTS+=(--gpus-per-node "$GPUS_PER_NODE")
[ -z "${CPUS_PER_TASK:-}" ] || OPTS+=(--cpus-per-task "$CPUS_PER_TASK")
[ -z "${PARTITION:-}" ] || OPTS+=(--partition "$PARTITION")
[ -z "${TIME_LIMIT:-}" ] || OPTS+=(--time "$TIME_LIMIT")
[ -z "${STOP_NOTICE_S:-}" ] || OPTS+=(--signal "B:USR1@$STOP_NOTICE_S")

mkdir -p "$log_dir"
submitted=$(sbatch "${OPTS[@]}" launch/slurm.sbatch "$@") || die "sbatch refused the job (above)"
job=${submitted%%;*}  # --parsable prints "id" or "id;cluster"
log=${JOB_LOG//%j/$job}
[[ "$log" = /* ]] || log="$PWD/$log"
echo "submitted SLURM job $job; log: $log"
(( WAIT == 1 )) || exit 0

# Poll slurmctld (sbatch --wait polls far more slowly). A requeued job goes back to PENDING and
# is waited for again; a state counts as final once two polls in a row show it, since a job that
# SLURM requeues passes through its end states on the way back to PENDING.
field() { grep -o " $1=[^ ]*" <<< " $2" | head -n 1 | cut -d= -f2; }
trap 'echo; echo "stopped waiting; job $job keeps running (scancel $job stops it)" >&2; exit 130' INT
shown="" final_seen=""
while :; do
  record=$(scontrol show job -o "$job" 2>&1) \
    || die "scontrol show job $job: $record (is the job older than slurmctld's MinJobAge?)"
  state=$(field JobState "$record")
  restarts=$(field Restarts "$record")
  if [ "$state/$restarts" != "$shown" ]; then
    echo "job $job: $state (restarts: ${restarts:-0})"
    shown="$state/$restarts"
  fi
  case "$state" in
    COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
      [ "$final_seen" = "$state/$restarts" ] && break
      final_seen="$state/$restarts" ;;
    REQUEUE_HOLD | SPECIAL_EXIT)
      echo "job $job is held ($state): \`scontrol release $job\` lets it run again" >&2
      exit 1 ;;
    *) final_seen="" ;;
  esac
  sleep "$WAIT_POLL_S"
done

# ExitCode=STATUS:SIGNAL of the batch script; a shell reports death by signal N as 128+N.
exit_code=$(field ExitCode "$record")
status=${exit_code%%:*} signal=${exit_code##*:}
if (( signal > 0 )); then
  status=$(( 128 + signal ))
elif (( status == 0 )) && [ "$state" != COMPLETED ]; then
  status=1
fi
echo "job $job: $state, exit code $status; log: $log"
exit "$status"
