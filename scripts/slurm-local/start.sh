#!/usr/bin/env bash
# Start a one-node SLURM on this machine for glmtrain's tests (tests/test_slurm.py) and for trying the
# sbatch scripts on a laptop or CI box: Debian's slurmctld + slurmd + munge, talking over 127.0.0.1,
# started directly (no systemd), stopped by scripts/slurm-local/stop.sh.  Needs root (daemons, /etc).
#
#   scripts/slurm-local/start.sh [--fresh]     --fresh: forget earlier jobs and node state
#
# Missing packages are installed with apt-get (slurmctld slurmd slurm-client munge, without the
# recommended extras).  Settings that matter for tests (facts measured on slurm-wlm 22.05):
#   AuthInfo=cred_expire=5        a requeued job may restart 5 s after it ended (default 120 s)
#   sched_interval=2              the scheduler looks at pending jobs every 2 s (default 60 s)
#   kill_invalid_depend           an afterok successor of a failed job is cancelled, not left pending
#   JobRequeue=1, KillWait=5      requeue allowed; SIGKILL 5 s after SIGTERM at job end
# Environment: SLURM_LOCAL_BASE (state, logs, pid files; default /tmp/slurm-local),
#              SLURM_LOCAL_WAIT_S (seconds to wait for the node; default 60).
set -euo pipefail

BASE=${SLURM_LOCAL_BASE:-/tmp/slurm-local}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
CONF=/etc/slurm/slurm.conf
MARK="# written by glmtrain scripts/slurm-local/start.sh"
fresh=0
case "${1:-}" in
  --fresh) fresh=1 ;;
  "") ;;
  *) echo "usage: $0 [--fresh]" >&2; exit 2 ;;
esac
say() { echo "slurm-local: $*"; }
fail() { echo "slurm-local: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "run as root (it starts daemons and writes $CONF)"

# a pid file's process, if it is alive and has the expected name (zombies do not count)
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}
halt() {  # halt PIDFILE NAME: SIGTERM, up to 15 s, SIGKILL
  local pid i
  running "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 150); do running "$1" "$2" || break; sleep 0.1; done
  if running "$1" "$2"; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$1"
}

# ---- packages
need=()
for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
if [ ${#need[@]} -gt 0 ]; then
  say "installing slurmctld slurmd slurm-client munge with apt-get (missing: ${need[*]})"
  command -v apt-get >/dev/null || fail "no apt-get here: install slurmctld, slurmd, slurm-client and munge yourself"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$BASE/run" "$BASE/log" "$BASE/spool/ctld" "$BASE/spool/d"

# ---- munge (authentication between the daemons and the clients)
for d in /etc/munge:0700 /run/munge:0755 /var/lib/munge:0711 /var/log/munge:0700; do
  install -d -o munge -g munge -m "${d#*:}" "${d%%:*}"
done
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  head -c 1024 /dev/urandom > /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_works; then
  running /run/munge/munged.pid munged || rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  for i in $(seq 50); do munge_works && break; sleep 0.1; done
  munge_works || fail "munged does not answer (log: /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$BASE/run/munged.pid"  # ours: stop.sh may stop it
  say "munged started"
fi

# ---- configuration: one node, the hardware slurmd detects (more would get the node drained)
node=$(hostname -s)
hw=$(slurmd -C | head -n1 | cut -d' ' -f2-)
new=$(mktemp)
cat > "$new" <<CONF
$MARK
ClusterName=glmtrain-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
StateSaveLocation=$BASE/spool/ctld
SlurmdSpoolDir=$BASE/spool/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node $hw State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
changed=0
if ! cmp -s "$new" "$CONF"; then
  mkdir -p /etc/slurm
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then cp "$CONF" "$CONF.before-glmtrain"; fi
  install -m 0644 "$new" "$CONF"
  changed=1
fi
rm -f "$new"

# ---- daemons (whoever started them: a changed config or --fresh restarts them)
if [ "$changed" -eq 1 ] || [ "$fresh" -eq 1 ]; then
  halt "$BASE/run/slurmd.pid" slurmd
  halt "$BASE/run/slurmctld.pid" slurmctld
fi
if [ "$fresh" -eq 1 ]; then
  rm -rf "${BASE:?}/spool" && mkdir -p "$BASE/spool/ctld" "$BASE/spool/d"
  # state directories of other start scripts on the same base must not bring old jobs back either
  rm -rf "${BASE:?}/state"
fi
if ! running "$BASE/run/slurmctld.pid" slurmctld; then slurmctld; fi
for i in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping 2>/dev/null | grep -q UP || fail "slurmctld does not answer (log: $BASE/log/slurmctld.log)"
if ! running "$BASE/run/slurmd.pid" slurmd; then slurmd -N "$node"; fi
deadline=$(( $(date +%s) + WAIT_S ))
state=""
until [ "$(date +%s)" -ge "$deadline" ]; do
  state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
case "$state" in idle|mixed|allocated|completing) ;; *) fail "node $node is '$state' after ${WAIT_S} s (logs: $BASE/log)" ;; esac
say "SLURM READY: node $node ($hw) is $state; slurmctld pid $(cat "$BASE/run/slurmctld.pid"), slurmd pid $(cat "$BASE/run/slurmd.pid"); logs in $BASE/log"
