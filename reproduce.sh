#!/usr/bin/env bash
# The paper's 3 x 3 comparison (tasks x methods) at small scale, in one command:
#
#   bash reproduce.sh                  # ~47 min on a 2-core CPU
#   MINUTES=3 OUT=/tmp/r bash reproduce.sh   # a quicker, rougher pass
#
# Each (task, method) fine-tunes the committed base (assets/base, `python retuning.py pretrain`)
# with LoRA for the same wall-clock budget, MINUTES on one core; two runs share the machine's two
# cores at a time. Then every run is evaluated from length 1 (DP: 2) to twice its training length.
# OUT gets results.json, results.md (accuracy per length; in- and out-of-distribution means;
# Re-Tuning's margin; training cost per method: tokens per sequence, peak memory) and one plot
# per task, and OUT/runs/<task>-<method> holds each run (adapter, config, metrics, summary) that
# `python eval.py OUT/runs/<task>-<method>` evaluates again.
set -euo pipefail
cd "$(dirname "$0")"
MINUTES=${MINUTES:-7}
OUT=${OUT:-results}
PER_LENGTH=${PER_LENGTH:-50}
mkdir -p "$OUT/runs"

fine_tune() {  # task method: one run on one core, its progress in OUT/runs/<task>-<method>.log
    OMP_NUM_THREADS=1 TQDM_MININTERVAL=30 python retuning.py train --task "$1" --method "$2" --minutes "$MINUTES" \
        --eval-every 0 --save-every 500 \
        --out "$OUT/runs/$1-$2" --overwrite > "$OUT/runs/$1-$2.log" 2>&1
    echo "$1-$2: $(tail -n 1 "$OUT/runs/$1-$2.log")"
}
export -f fine_tune
export MINUTES OUT

for task in addition parity dp; do
    for method in baseline scratchpad retuning; do echo "$task $method"; done
done | xargs -P 2 -L 1 bash -c 'fine_tune "$0" "$1"'

python eval.py "$OUT"/runs/*-*/ --per-length "$PER_LENGTH" --out "$OUT" | tee "$OUT/eval.log"
