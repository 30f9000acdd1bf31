#!/usr/bin/env bash
# One prepared GPU check (run from the repo root on a GPU machine; ~5 minutes on one H100/H200):
# the real CLI in bf16-mixed under each strategy that runs on one GPU, resume on GPU, and a
# side-by-side throughput table. Prints a summary table; logs go to $OUT (or /tmp/gpu_check).
#   bash scripts/gpu_check.sh                 # every row
#   bash scripts/gpu_check.sh zero3 hyena_fsdp # only these rows (no throughput table)
# Without a package index, first fill .whl/ here with ../shared/tools/gpu-wheels.sh and carry it.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 GLMTRAIN_CACHE=/tmp/glmtrain-cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
COMMON="experiment=smoke trainer.accelerator=gpu trainer.max_steps=40 trainer.micro_batch_size=32 data.window=1024 trainer.val_every=20 trainer.ckpt_every=20 logger=csv"
SUMMARY=()
ONLY=" $* "
row() {  # row NAME RUN_DIR TIMEOUT ARGS...
  local name=$1 rd=$2 to=$3; shift 3
  [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]] && return
  local t0=$(date +%s)
  timeout "$to" python3 -m glmtrain $COMMON "$@" run_dir=/tmp/g/$rd > "$OUT/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  local bpb=$(grep -A1 "held-out" "$OUT/$name.log" | tail -1 | awk '{print $NF}')
  local tps=$(grep -oE "training [0-9]+ tokens/s" "$OUT/$name.log" | grep -oE "[0-9]+")
  local err=""; [ $rc -ne 0 ] && err=$(grep -E "Error|error" "$OUT/$name.log" | tail -1 | cut -c1-110)
  SUMMARY+=("$(printf '%-16s rc=%-3s %4ss  val_bpb=%-8s tok/s=%-9s %s' "$name" "$rc" "$dt" "${bpb:-?}" "${tps:-?}" "$err")")
  echo "${SUMMARY[-1]}"
}
row single_bf16 single 120
row resume      single 90  trainer.max_steps=60
row ddp_nccl    ddp    120 strategy=ddp
row fsdp2       fsdp   120 strategy=fsdp
row zero2       zero2  150 strategy=deepspeed strategy.zero_stage=2
row zero3       zero3  150 strategy=deepspeed strategy.zero_stage=3
row hyena_fsdp  hyena  120 model=hyena strategy=fsdp
row evo2_bf16   evo2   120 model=evo2
row evo2_fsdp   evo2f  120 model=evo2 strategy=fsdp
if [ "$ONLY" != "  " ]; then
  for n in $ONLY; do grep -q "Error" "$OUT/$n.log" && { echo "== $n (tail) =="; grep -v "^\s*$" "$OUT/$n.log" | tail -25 | cut -c1-200; }; done
  echo "== summary =="; printf '%s\n' "${SUMMARY[@]}"; exit 0
fi
grep -q "resuming from" "$OUT/resume.log" && echo "resume: resumed from step 40 checkpoint" || echo "resume: DID NOT RESUME"
timeout 120 python3 scripts/bench_throughput.py --models transformer hyena evo2 --seq 1024 --batch 16 --steps 5 2>&1 | tee "$OUT/throughput.log" | tail -5
echo "== summary =="; printf '%s\n' "${SUMMARY[@]}"
