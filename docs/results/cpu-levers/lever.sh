#!/usr/bin/env bash
# One lever of docs/results/cpu-levers.md: train SmolLM2-135M-Instruct on a cpu preset's
# self-distilled answers with the preset's batch, length, seed and warm-up plus the given
# options, then score it (eval.py). Resumable: a rerun continues the training from its
# newest checkpoint and skips what is already written.
#   bash docs/results/cpu-levers/lever.sh RUN NAME [msn train options...]
# RUN: the folder of `msn reproduce --preset cpu --out RUN` (its data-self/, questions).
set -euo pipefail
RUN=$1 NAME=$2; shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=$(msn fetch smollm2-135m-instruct | tail -1)
OUT=$RUN/levers/$NAME
mkdir -p "$RUN/levers"
if [ ! -f "$OUT/msn_config.json" ]; then
  RESUME=(); [ -d "$OUT" ] && RESUME=(--resume)
  msn train --model "$MODEL" --data "$RUN/data-self/train.jsonl" --output-dir "$OUT" \
    --batch-size 4 --max-length 384 --warmup 0 --seed 42 --save-steps 40 "${RESUME[@]}" "$@"
fi
python "$HERE/eval.py" "$RUN" "$OUT" "$OUT.eval.json"
