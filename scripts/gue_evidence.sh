#!/usr/bin/env bash
# Issue 13 evidence: a small model pretrained with glmtrain on CPU, fine-tuned on three GUE tasks, beside the
# same model from random weights, a k-mer logistic-regression baseline and the published numbers
# (../shared/data/README.md). Every step is an ordinary glmtrain command; results land in $OUT.
#
#   bash scripts/gue_evidence.sh                 # OUT=runs/gue-evidence, 400 fine-tuning steps per task
#   STEPS=2000 PRETRAIN_S=7200 bash scripts/gue_evidence.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gue-evidence}
GUE=${GUE:-../shared/data/benchmarks/gue}
GENOMES=${GENOMES:-../shared/data/genomes}
STEPS=${STEPS:-400}
PRETRAIN_S=${PRETRAIN_S:-4200}  # wall-clock cap of the pretraining (cumulative over reruns)
METHOD=${METHOD:-full}
THREADS=${THREADS:-0}
TASKS=${TASKS:-"prom/prom_core_all tf/0 mouse/0"}
mkdir -p "$OUT"

# 1. pretrain HyenaDNA tiny (next-token) on human DNA: the bundled hg19 excerpts + GRCh37 chrX (first 70 Mb)
$PY -m glmtrain model=hyena run_dir="$OUT/pretrain" trainer.max_steps=4000 trainer.max_time_s="$PRETRAIN_S" \
  trainer.progress=none trainer.val_every=500 trainer.ckpt_every=100 trainer.threads="$THREADS" \
  "data.sources=[{path:\"pkg://glmtrain/resources/genomes/human_hg19_chr3_42M_2mb.fa.gz\",species:human,weight:1.0},{path:\"pkg://glmtrain/resources/genomes/human_hg19_chr5_124M_2mb.fa.gz\",species:human,weight:1.0},{path:\"pkg://glmtrain/resources/genomes/human_hg19_chr4_103M_2mb.fa.gz\",species:human,weight:1.0},{path:\"$GENOMES/human_grch37_chrX_first70mb.fa.gz\",species:human,weight:1.0}]"

# 2. fine-tune the pretrained body and a random initialisation with the same budget
for t in $TASKS; do
  name=$(echo "$t" | tr / _)
  for init in pretrained random; do
    from=""; [ "$init" = pretrained ] && from="$OUT/pretrain"
    [ -f "$OUT/ft-$name-$init/metrics.json" ] && continue
    $PY -m glmtrain task=finetune model=hyena task.data_dir="$GUE/$t" task.init_from="$from" task.method="$METHOD" \
      run_dir="$OUT/ft-$name-$init" trainer.max_steps="$STEPS" trainer.val_every=$((STEPS / 4)) \
      trainer.micro_batch_size=32 trainer.progress=none trainer.threads="$THREADS" optim.lr=1e-3 logger=csv
  done
done

# 3. k-mer logistic regression on the same splits
[ -f "$OUT/kmer.json" ] || $PY scripts/kmer_baseline.py $(for t in $TASKS; do echo "$GUE/$t"; done) --json "$OUT/kmer.json"

# 4. the table
$PY - "$OUT" $TASKS <<'PY'
import json, sys
from pathlib import Path
out, tasks = Path(sys.argv[1]), sys.argv[2:]
published = {"prom/prom_core_all": (69.37, 70.33, 68.90, 55.88), "tf/0": (71.99, 66.64, 66.84, 62.21),
             "mouse/0": (56.76, 63.31, 44.42, 51.44)}
kmer = {Path(r["task"]).as_posix().split("gue/")[-1]: r for r in json.loads((out / "kmer.json").read_text())}
print("test MCC x100 | ours: HyenaDNA tiny pretrained | same, random init | k-mer LR (ours) | DNABERT-2 | NT-2500M-multi | DNABERT 6-mer | 5-mer LR (README)")
for t in tasks:
    name = t.replace("/", "_")
    m = {i: json.loads((out / f"ft-{name}-{i}" / "metrics.json").read_text()) for i in ("pretrained", "random")}
    p = published[t]
    print(f"{t:<20} {100 * m['pretrained']['test']['mcc']:6.2f} {100 * m['random']['test']['mcc']:6.2f} "
          f"{100 * kmer[t]['test']['mcc']:6.2f} | {p[0]:6.2f} {p[1]:6.2f} {p[2]:6.2f} {p[3]:6.2f}")
PY
