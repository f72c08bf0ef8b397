#!/usr/bin/env bash
# The prepared GPU check, for a machine with CUDA (one GPU, or more for the torchrun line):
#
#   bash bench/gpu.sh            # each check under its own time limit; OUT=/tmp/retuning-gpu keeps the logs
#
# Runs, each under its own time limit: the CUDA tests; the decoder benchmark (batched decoder vs
# the release's generate-per-context harness, bench/decode.py) at the embedded, SmolLM2-135M and
# LLaMA-7B shapes; the LoRA training-step benchmark (ours vs transformers + peft, bench/train.py)
# at the SmolLM2 and 7B shapes (random weights, bf16, LoRA r=16); and, with 2 GPUs or more, a
# 2-process torchrun fine-tune. Prints one table: what ran, its exit code, its seconds, and the
# line that carries its result. Without CUDA it stops at once with one line.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False): run it on a machine with an NVIDIA GPU" >&2
    exit 1
fi
OUT=${OUT:-$(mktemp -d /tmp/retuning-gpu.XXXX)}
mkdir -p "$OUT"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
NAME=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
ROWS=()

check() {  # name, seconds allowed, result pattern, command...: run it, keep its log, add a row
    local name=$1 limit=$2 pattern=$3; shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? result
    result=$(grep -E "$pattern" "$OUT/$name.log" | tail -n 2 | tr '|' ' ' | paste -sd ';')
    ROWS+=("| $name | $rc | $((SECONDS - t0)) | ${result:-see $OUT/$name.log} |")
    echo "$name: exit $rc, $((SECONDS - t0)) s" >&2
}

check cuda-tests 120 "passed|failed" python -m pytest -q tests -k cuda
check decode-embedded 60 "speed-up over" python bench/decode.py --digits 16 --rounds 1
check decode-smollm2 60 "speed-up over" python bench/decode.py --shape smollm2 --digits 16 --rounds 1 \
    --batch 64 --single-problems 4 --oracle-problems 2 --release-problems 4
check decode-7b 120 "speed-up over" python bench/decode.py --shape 7b --digits 16 --rounds 1 \
    --batch 32 --single-problems 2 --oracle-problems 1 --release-problems 2
check train-smollm2 60 "speed-up:|of peak" python bench/train.py --shape smollm2 --data addition-retuning --r 16 --steps 10
check train-7b 120 "speed-up:|of peak" python bench/train.py --shape 7b --r 16 --batch 4 --seq 256 --steps 5
if [ "$GPUS" -ge 2 ]; then
    check torchrun-2gpu 90 "saved" torchrun --standalone --nproc_per_node 2 retuning.py train --task addition \
        --steps 100 --device cuda --eval-every 0 --out "$OUT/ddp" --overwrite
else
    ROWS+=("| torchrun-2gpu | - | 0 | skipped: $GPUS GPU |")
fi

echo
echo "$NAME x $GPUS, torch $(python -c 'import torch; print(torch.__version__)'), logs in $OUT"
echo "| check | exit | seconds | result |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
