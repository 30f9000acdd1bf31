#!/usr/bin/env bash
# slurm/launch.sh - the body of glmtrain's sbatch scripts (they exec it; do not submit it itself).
#
#   launch.sh [hydra overrides...]
#
# * run directory: the run_dir=... override, else runs/<job name>-<job id> (stable across requeues,
#   so a requeued job resumes where it stopped).  Relative paths are relative to the submit directory.
# * logs: everything (this script, srun, every rank, every restart) is appended to
#   <run_dir>/slurm/job-<job id>.log; the sbatch --output file only gets a pointer to it.
# * launch: `srun` starts one task per GPU (or per CPU process): --ntasks-per-node tasks on each of
#   the job's nodes; glmtrain reads the world (ranks, nodes, tasks per node) from SLURM itself.
# * signals: SIGUSR1 (e.g. `scancel --signal=USR1 --batch`, or `--signal=B:USR1@T`) reaching this
#   shell is forwarded to srun, which forwards it to every task; glmtrain only sets a flag, and at the
#   next step boundary all ranks checkpoint, rank 0 runs `scontrol requeue`, and the requeued job
#   resumes.  SIGTERM (scancel, preemption, time limit) is NOT forwarded: slurmstepd sends it to every
#   task itself, and srun would turn a forwarded SIGTERM into an immediate kill of the step.
# Env: GLMTRAIN_PYTHON (default: <submit dir>/.venv/bin/python if present, else python3),
#      GLMTRAIN_SRUN_ARGS (extra srun options, e.g. "--cpu-bind=none").
set -uo pipefail

args=("$@")
run_dir=""
for a in "$@"; do
  case "$a" in run_dir=*) run_dir=${a#run_dir=} ;; esac
done
job="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?launch.sh runs inside a SLURM job (sbatch)}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
if [ -z "$run_dir" ]; then
  run_dir="runs/${SLURM_JOB_NAME:-glmtrain}-$job"
  args+=("run_dir=$run_dir")
fi
mkdir -p "$run_dir/slurm" || { echo "glmtrain-launch: cannot create $run_dir/slurm" >&2; exit 1; }
log="$run_dir/slurm/job-$job.log"
echo "glmtrain-launch: job $job (restart ${SLURM_RESTART_COUNT:-0}) logs to $log"
exec >>"$log" 2>&1

py=${GLMTRAIN_PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "${SLURM_SUBMIT_DIR:-.}/.venv/bin/python" ]; then py="${SLURM_SUBMIT_DIR:-.}/.venv/bin/python"; else py=python3; fi
fi
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
ntasks=${SLURM_NTASKS:-1}
per_node=${SLURM_NTASKS_PER_NODE:-$(( ntasks / nodes ))}
export PYTHONUNBUFFERED=1
echo "=== $(date '+%F %T') job $job restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
     "$nodes node(s) x ${per_node%%(*} task(s), run_dir=$run_dir, python=$py"

child=""
forward() {  # forward a signal to srun (which passes it to every task); never act on it here
  echo "glmtrain-launch: SIG$1 at $(date +%T), forwarding to the training tasks"
  [ -n "$child" ] && kill -s "$1" "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'echo "glmtrain-launch: SIGTERM at $(date +%T) (SLURM signals every task itself)"' TERM

# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 ${GLMTRAIN_SRUN_ARGS:-} "$py" -m glmtrain "${args[@]}" &
child=$!
while :; do
  wait "$child"
  kill -0 "$child" 2>/dev/null || break  # `wait` returned early because a trapped signal arrived
done
wait "$child"; rc=$?
echo "=== $(date '+%F %T') training exited with status $rc"
exit "$rc"
