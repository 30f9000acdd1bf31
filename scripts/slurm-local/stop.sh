#!/usr/bin/env bash
# Stop the one-node SLURM of scripts/slurm-local/start.sh: cancel every job (so that no job process or
# slurmstepd outlives the cluster), then stop slurmd, slurmctld and -- if start.sh started it -- munged,
# each by the pid in its pid file.  Job history and node state stay in $SLURM_LOCAL_BASE (start.sh
# --fresh forgets them).
set -uo pipefail
BASE=${SLURM_LOCAL_BASE:-/tmp/slurm-local}
say() { echo "slurm-local: $*"; }
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}
halt() {
  local pid i
  running "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 150); do running "$1" "$2" || break; sleep 0.1; done
  if running "$1" "$2"; then say "$2 (pid $pid) ignored SIGTERM for 15 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$1"
  say "stopped $2 (pid $pid)"
}

if running "$BASE/run/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    scancel --state=PENDING 2>/dev/null || true
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for i in $(seq 150); do squeue -h -t RUNNING,COMPLETING 2>/dev/null | grep -q . || break; sleep 0.2; done
  fi
  # job steps end with their slurmstepd: wait for those to go before slurmd does
  for i in $(seq 150); do pgrep -x slurmstepd >/dev/null || break; sleep 0.1; done
fi
halt "$BASE/run/slurmd.pid" slurmd
halt "$BASE/run/slurmctld.pid" slurmctld
halt "$BASE/run/munged.pid" munged
say "stopped"
