#!/usr/bin/env bash
# A longer run of the cpu preset's MSN recipe (LoRA rank 24, alpha 48, lr 1e-3 cosine, 8 noise
# spans of 5, batch 4, max length 384, no warm-up, seed 42) on the *human-written* stdlib code set
# (no self-distillation): 320 steps (1,280 samples, 2.7x the preset's 480), checkpoints every 80.
# Then: docs/results/cpu-levers/eval.py on the 80-, 160- and 320-step models (held-out loss, tree
# without retrieval, `tr-jacobi`, own words), msn's default decoder cold with `ar` in the same run
# on the 10 held-out prompts and the 10 requests in a user's own words (80 and 320 steps),
# HumanEval (he.py, 320 steps), and what each model writes (quality.py).
# Resumable: a rerun continues the training from its newest checkpoint and skips what is written.
#   bash longer.sh WORK      (WORK: a scratch folder; run from the repository root)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EVAL=$(cd "$HERE/../../../cpu-levers" && pwd)/eval.py
W=${1:?usage: bash longer.sh WORK}
source "$HERE/../human-setup.sh"
if [ ! -f msn/msn_config.json ]; then
  msn train --model "$MODEL" --data data/train.jsonl --output-dir msn --batch-size 4 --max-length 384 \
    --warmup 0 --seed 42 --lr 1e-3 --scheduler cosine --noise-spans 8 --noise-len 5 --lora-r 24 --lora-alpha 48 \
    --max-steps 320 --save-steps 80 --save-total-limit 0 --logging-steps 20 $(resume_flag msn)
fi
for s in 80 160; do python "$EVAL" run msn/checkpoint-$s msn-$s.eval.json; done
python "$EVAL" run msn msn-320.eval.json
for m in msn msn/checkpoint-80; do
  for q in heldout_questions_10x50 own_words_questions; do
    o="bench-$q-$(basename $m)"
    [ -f "$o/summary.json" ] || msn bench --model $m --bench run/$q.jsonl --methods ar,tr-jacobi \
      --max-new-tokens 128 --warmup 1 --cold --dtype float32 --out "$o"
  done
done
python "$HERE/he.py" msn he-320.json
# What each model writes: HumanEval's first 40 problems and the own-words requests (quality.py)
python "$HERE/quality.py" quality.json run/own_words_questions.jsonl "base (smollm2-135m-instruct)=$MODEL" \
  "shipped adapter (smollm2-msn-code)=$SHIPPED" \
  "human-written answers, 80 steps=msn/checkpoint-80" "human-written answers, 160 steps=msn/checkpoint-160" \
  "human-written answers, 240 steps=msn/checkpoint-240" "human-written answers, 320 steps=msn"
