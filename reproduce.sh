#!/usr/bin/env bash
# The 3 tasks x 3 methods comparison, fine-tuned from the embedded pretrained base with LoRA, the
# same budget per run, then evaluated up to twice the training length:
#     bash reproduce.sh                 # about 50 minutes on 2 CPU cores (two runs at a time)
#     STEPS=3000 bash reproduce.sh      # another budget
# Writes results/runs/<task>-<method>/ (config, metrics, adapter), results/results.json,
# results/results.md, results/<task>.png and results/tokens.md.
set -euo pipefail
cd "$(dirname "$0")"
export BASE=${BASE:-assets/base} STEPS=${STEPS:-2500}

finetune() {  # task method max_len; one thread per run: a tiny model gains nothing from a second
  OMP_NUM_THREADS=1 python retuning.py train --task "$1" --method "$2" --max-len "$3" --base "$BASE" \
      --steps "$STEPS" --eval-every 0 --out "results/runs/$1-$2" --overwrite > "results/runs/$1-$2.log" 2>&1
  echo "done: $1 $2 ($(tail -c 120 "results/runs/$1-$2.log" | tr '\r' '\n' | tail -n 1))"
}
export -f finetune
mkdir -p results/runs
for task in "addition 8" "parity 8" "dp 5"; do
  for method in retuning scratchpad baseline; do
    set -- $task
    echo "$1 $method $2"
  done
done | xargs -P 2 -L 1 bash -c 'finetune "$@"' _
python eval.py results/runs/*/ --per-length 50 --out results
python retuning.py data --table > results/tokens.md
