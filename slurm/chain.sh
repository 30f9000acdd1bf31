#!/usr/bin/env bash
# slurm/chain.sh - submit a chain of dependent training stages (e.g. context extension 8k -> 32k -> ...).
#
#   slurm/chain.sh -d BASE_DIR [-s SCRIPT] [-b "SBATCH OPTIONS"] [-c "COMMON OVERRIDES"] [-n NAME] -- \
#       "STAGE 1 OVERRIDES" "STAGE 2 OVERRIDES" ...
#
# Stage i (1-based) is one job of SCRIPT (default slurm/train_1node.sbatch) with
#   COMMON OVERRIDES + STAGE i OVERRIDES + run_dir=BASE_DIR/stage<i>
#   + trainer.init_from=<run_dir of stage i-1>   (i > 1: weights only, from that stage's final checkpoint)
# submitted with --dependency=afterok:<previous job> --kill-on-invalid-dep=yes, so a stage starts only
# after the previous one completed successfully (requeues included) and the rest of the chain is
# cancelled if a stage fails.  A stage string may set its own run_dir=... or trainer.init_from=...;
# overrides are split on whitespace (no spaces inside a value).  Prints one job id per line.
#
# Example (two stages, 8 GPUs each):
#   slurm/chain.sh -d runs/ctx -c "model=evo2_7b" -- \
#       "data.window=8192 trainer.max_steps=20000" \
#       "data.window=32768 trainer.max_steps=12500 optim.lr=3e-5"
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script="$here/train_1node.sbatch"; base=""; sbatch_opts=""; common=""; name="glmtrain"
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -d) base=$2; shift 2 ;;
    -s) script=$2; shift 2 ;;
    -b) sbatch_opts=$2; shift 2 ;;
    -c) common=$2; shift 2 ;;
    -n) name=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "chain.sh: unknown option $1" >&2; usage ;;
  esac
done
[ -n "$base" ] || { echo "chain.sh: -d BASE_DIR is required" >&2; usage; }
[ $# -ge 1 ] || { echo "chain.sh: give at least one stage (a quoted string of overrides) after --" >&2; usage; }
[ -f "$script" ] || { echo "chain.sh: no sbatch script $script" >&2; exit 2; }
export GLMTRAIN_HOME=${GLMTRAIN_HOME:-$(cd "$here/.." && pwd)}

prev=""; prev_dir=""; i=0
for stage in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2206
  ov=($common $stage)
  case " ${ov[*]} " in *" run_dir="*) ;; *) ov+=("run_dir=$base/stage$i") ;; esac
  if [ -n "$prev" ]; then
    case " ${ov[*]} " in *" trainer.init_from="*) ;; *) ov+=("trainer.init_from=$prev_dir") ;; esac
  fi
  for o in "${ov[@]}"; do case "$o" in run_dir=*) prev_dir=${o#run_dir=} ;; esac; done
  dep=()
  [ -n "$prev" ] && dep=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
  # shellcheck disable=SC2086
  prev=$(sbatch --parsable --job-name="$name-s$i" "${dep[@]}" $sbatch_opts "$script" "${ov[@]}")
  prev=${prev%%;*}
  echo "$prev"
done
