#!/usr/bin/env bash
# slurm/chain.sh - run a context schedule as one SLURM job per stage, chained with afterok.
#
#   slurm/chain.sh [-s SCRIPT] [-b "SBATCH OPTIONS"] [-n NAME] -- OVERRIDES...
#
# OVERRIDES are the Hydra overrides of the run, exactly as for `python -m glmtrain` (one argument each),
# and must include run_dir=... and a schedule (context=...).  The stages are read from the config
# (`python -m glmtrain.schedule OVERRIDES`); stage k is one job of SCRIPT (default slurm/train_1node.sbatch)
# running the SAME command with trainer.stop_at_step=<last step of stage k> (the last stage without it),
# submitted with --dependency=afterok:<job of stage k-1> --kill-on-invalid-dep=yes.  Every job resumes
# the one run directory where the previous one stopped (the next stage starts from the previous stage's
# final weights), a requeued job resumes inside its stage, a failed stage cancels the rest.  Prints one
# job id per line.
#
# The same schedule also runs as ONE job (`sbatch slurm/train_1node.sbatch context=... run_dir=...`):
# it requeues itself on SIGUSR1 before its time limit and resumes in the right stage.  One job per stage
# suits stages with different resources (`-b` applies to all; submit by hand for per-stage options).
#
# Example (the Evo 2 ladder, 7 jobs):
#   slurm/chain.sh -n evo2 -b "--nodes=8" -s slurm/train_multinode.sbatch -- \
#       model=evo2_7b context=evo2_8k_to_1m strategy=fsdp run_dir=runs/evo2-ladder
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script="$here/train_1node.sbatch"; sbatch_opts=""; name="glmtrain"
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -s) script=$2; shift 2 ;;
    -b) sbatch_opts=$2; shift 2 ;;
    -n) name=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "chain.sh: unknown option $1 (overrides go after --)" >&2; usage ;;
  esac
done
[ $# -ge 1 ] || { echo "chain.sh: give the run's overrides after -- (context=..., run_dir=...)" >&2; usage; }
[ -f "$script" ] || { echo "chain.sh: no sbatch script $script" >&2; exit 2; }
case " $* " in *" run_dir="*) ;; *) echo "chain.sh: give run_dir=... (every stage's job continues that run directory)" >&2; exit 2 ;; esac
case " $* " in *" trainer.stop_at_step="*) echo "chain.sh: trainer.stop_at_step is set per stage job by chain.sh; remove it" >&2; exit 2 ;; esac
export GLMTRAIN_HOME=${GLMTRAIN_HOME:-$(cd "$here/.." && pwd)}
py=${GLMTRAIN_PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$PWD/.venv/bin/python" ]; then py="$PWD/.venv/bin/python"; else py=python3; fi
fi

stages=$(cd "$GLMTRAIN_HOME" && "$py" -m glmtrain.schedule "$@") || exit 2
n=$(printf '%s\n' "$stages" | wc -l)
prev=""
while read -r k sname window first last tokens; do
  stop=()
  [ "$k" -lt "$n" ] && stop=("trainer.stop_at_step=$last")
  dep=()
  [ -n "$prev" ] && dep=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
  # shellcheck disable=SC2086
  prev=$(sbatch --parsable --job-name="$name-s$k" "${dep[@]}" $sbatch_opts "$script" "$@" "${stop[@]}")
  prev=${prev%%;*}
  echo "$prev"
done <<< "$stages"
