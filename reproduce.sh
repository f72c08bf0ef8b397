#!/usr/bin/env bash
# The paper's 3 x 3 comparison (tasks x methods) at small scale, in one command:
#
#   bash reproduce.sh                                   # the committed results/: ~50 min on a 2-core CPU
#   TASKS=addition OUT=/tmp/r bash reproduce.sh         # one task only
#
# Each (task, method) fine-tunes the same base (BASE, default the committed assets/base) with LoRA
# for the same budget in optimizer steps (STEPS_<task>; addition's and DP's are the most their
# scratchpads, the longest contexts, do in the ~15 minutes we allowed a fine-tune), in the
# base's own position scheme (positions.py; POSITIONS overrides it, for every method alike), and
# REHEARSAL mixes that fraction of pretraining items into every method's data (default none).
# Two runs share the machine's two cores at a time, Re-Tuning's first. Then every run is
# evaluated from length 1 (DP: 2) to twice its training length, 50 problems per length, with
# --by-step. OUT gets results.json, results.md (accuracy per length; in- and out-of-distribution
# means; Re-Tuning's margins; each step's teacher-forced accuracy; training cost per method) and
# one plot per task; OUT/runs/<task>-<method> holds each run (adapter, config, metrics, summary,
# log) that `python eval.py OUT/runs/<task>-<method>` evaluates again.
set -euo pipefail
cd "$(dirname "$0")"

# bash reproduce.sh smollm2: the same comparison on the real SmolLM2-135M (`python retuning.py
# convert` first), one run at a time (each uses both cores), into results/smollm2/<task>-<method>/;
# each task's budget in steps is the same for its three formats (parity's training loss is below
# 1e-3 by step 50 at this recipe, hence 400). Training lengths: addition 1-5 digits, parity 1-8
# bits (the paper's: 15 and 21), DP 2-5 elements (the paper's); evaluated to twice that (DP: 2-10).
if [ "${1:-}" = smollm2 ]; then
    OUT=${OUT:-results/smollm2}
    ONLY=${TASKS:-}  # some tasks only: their evaluation goes to eval-<tasks>, not over eval/
    TASKS=${TASKS:-addition parity dp}
    declare -A STEPS=([addition]=1000 [parity]=400 [dp]=700) MAX_LEN=([addition]=5 [parity]=8 [dp]=5)
    # memory, not recipe: DP's scratchpad contexts (up to ~545 tokens) go 8 to a forward pass to fit 24 GiB;
    # the step still sums the gradient of all 32 (train.train_step)
    declare -A MICRO=([dp-scratchpad]=8)
    for task in $TASKS; do
        for method in retuning baseline scratchpad; do
            run="$OUT/$task-$method"
            # finished (its summary.json counts the whole budget): kept, rm -r it to train again. A run
            # stopped with Ctrl-C also writes summary.json, with the steps it reached.
            done_steps=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["steps"])' "$run/summary.json" 2>/dev/null || echo 0)
            [ "$done_steps" -ge "${STEPS[$task]}" ] && continue
            again=--overwrite
            [ -f "$run/checkpoint.pt" ] && again=--resume  # interrupted: continued from its checkpoint
            TQDM_MININTERVAL=60 python retuning.py train --task "$task" --method "$method" --base smollm2 \
                --max-len "${MAX_LEN[$task]}" --bf16 --lora-r 16 --lora-alpha 32 --lora-dropout 0 --lr 1e-3 --warmup 30 \
                --steps "${STEPS[$task]}" --micro-batch-size "${MICRO[$task-$method]:-32}" --eval-every 0 --out "$run" $again >> "$run.log" 2>&1
            echo "$task-$method: $(tail -n 1 "$run.log")"
        done
    done
    runs=()
    for task in $TASKS; do runs+=("$OUT"/"$task"-*/); done
    EVAL_OUT=${EVAL_OUT:-$OUT/eval${ONLY:+-${ONLY// /-}}}  # TASKS=parity: results/smollm2/eval-parity
    python eval.py "${runs[@]}" --per-length "${PER_LENGTH:-50}" --by-step --out "$EVAL_OUT" | tee "$EVAL_OUT.log"
    exit 0
fi
OUT=${OUT:-results}
BASE=${BASE:-assets/base}
TASKS=${TASKS:-addition parity dp}
PER_LENGTH=${PER_LENGTH:-50}
export STEPS_addition=${STEPS_addition:-2500} STEPS_parity=${STEPS_parity:-1500} STEPS_dp=${STEPS_dp:-250}
POSITION_FLAGS=${POSITIONS:+--positions $POSITIONS}
REHEARSAL=${REHEARSAL:-0}  # a fraction of pretraining items mixed into every method's data (train --rehearsal)
mkdir -p "$OUT/runs"

fine_tune() {  # task method: one run on one core, its progress in OUT/runs/<task>-<method>.log
    local steps="STEPS_$1"
    # shellcheck disable=SC2086  # POSITION_FLAGS is empty or two words
    OMP_NUM_THREADS=1 TQDM_MININTERVAL=60 python retuning.py train --task "$1" --method "$2" --steps "${!steps}" \
        --base "$BASE" $POSITION_FLAGS --rehearsal "$REHEARSAL" --eval-every 0 --save-every 500 \
        --out "$OUT/runs/$1-$2" --overwrite > "$OUT/runs/$1-$2.log" 2>&1
    echo "$1-$2: $(tail -n 1 "$OUT/runs/$1-$2.log")"
}
export -f fine_tune
export OUT BASE POSITION_FLAGS REHEARSAL

for task in $TASKS; do
    for method in retuning baseline scratchpad; do echo "$task $method"; done
done | xargs -P 2 -L 1 bash -c 'fine_tune "$0" "$1"'

runs=()
for task in $TASKS; do runs+=("$OUT"/runs/"$task"-*/); done
python eval.py "${runs[@]}" --per-length "$PER_LENGTH" --by-step --out "$OUT" | tee "$OUT/eval.log"
