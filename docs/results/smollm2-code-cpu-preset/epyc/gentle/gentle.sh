#!/usr/bin/env bash
# The issue's own MSN recipe, which the GPU reference run scaled up (all weights, lr 1e-4 cosine,
# 4 noise spans of 5, no warm-up, batch 4, max length 384, seed 42), on the *human-written* stdlib
# code set, for 120 steps with a checkpoint at 60: does the gentle rate keep what the model writes
# where LoRA at 1e-3 (../longer) did not, and what does msn's default decoder make of it?
# eval.py (held-out loss, tree without retrieval, `tr-jacobi`, own words) and quality.py
# (HumanEval 1-40, what it writes) on both; msn bench --cold (default decoder, `ar` in the same run)
# on the 120-step model. Then two more runs of the same recipe: without noise (plain SFT, the
# control) and with the paper's single noise span, each scored with quality.py (and the 1-span
# model with msn bench). Resumable: a rerun continues a training and skips what is written.
#   bash gentle.sh WORK      (WORK: a scratch folder; run from the repository root)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EVAL=$(cd "$HERE/../../../cpu-levers" && pwd)/eval.py
QUALITY=$HERE/../longer/quality.py
W=${1:?usage: bash gentle.sh WORK}
source "$HERE/../human-setup.sh"
# train OUT SAVE_STEPS NOISE...: the recipe above into OUT (continued where a run stopped).
train() {
  local out=$1 save=$2; shift 2
  [ -f "$out/msn_config.json" ] && return
  msn train --model "$MODEL" --data data/train.jsonl --output-dir "$out" --batch-size 4 --max-length 384 \
    --warmup 0 --seed 42 --lr 1e-4 --scheduler cosine "$@" \
    --max-steps 120 --save-steps "$save" --save-total-limit 0 --logging-steps 20 $(resume_flag "$out")
}
train msn 60 --noise-spans 4 --noise-len 5
cp msn/msn_config.json "$HERE/training.json"
python "$QUALITY" "$HERE/quality.json" run/own_words_questions.jsonl \
  "all weights, lr 1e-4, 60 steps=msn/checkpoint-60" "all weights, lr 1e-4, 120 steps=msn"
python "$EVAL" run msn "$HERE/msn-120.eval.json"
python "$EVAL" run msn/checkpoint-60 "$HERE/msn-60.eval.json"
bench msn 120
# Control: the same recipe with no noise (plain SFT, the same data order, steps, rate and seed),
# to tell what the human-written data does to what the model writes from what MSN's noise does.
train sft 60 --no-noise
cp sft/msn_config.json "$HERE/training-sft.json"
python "$QUALITY" "$HERE/quality.json" run/own_words_questions.jsonl \
  "SFT, all weights, lr 1e-4, 60 steps=sft/checkpoint-60" "SFT, all weights, lr 1e-4, 120 steps=sft"
# MSN with the paper's single noise span, the rest as above: does less noise keep SFT's writing?
train msn1 120 --noise-spans 1 --noise-len 5
cp msn1/msn_config.json "$HERE/training-1span.json"
python "$QUALITY" "$HERE/quality.json" run/own_words_questions.jsonl "MSN, 1 span, all weights, lr 1e-4, 120 steps=msn1"
bench msn1 1span
# The committed training summaries (machine paths as ~) and the answers the decoders reproduce (`ar`).
sed -i "s#\"$HOME/#\"~/#g" "$HERE"/training*.json
for run in 120 1span; do
  python "$HERE/ar_answers.py" "$HERE/answers-$run.jsonl" "bench-heldout_questions_10x50-$run" "bench-own_words_questions-$run"
done
# The held-out columns of the page's quality table (repeated lines, lines copied from the prompt, closed)
python "$HERE/../longer/answers.py" run/heldout_questions_10x50.jsonl "$HERE"/answers-*.jsonl
