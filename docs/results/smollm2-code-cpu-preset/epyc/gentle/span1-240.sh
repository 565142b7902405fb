#!/usr/bin/env bash
# gentle.sh's single-span recipe (all weights, lr 1e-4 cosine, 1 noise span of 5, no warm-up,
# batch 4, max length 384, seed 42) trained twice as long, 240 steps, then exported as the
# <= 16 MiB LoRA adapter that would ship: msn's default decoder (cold, `ar` in the same run) on the
# held-out questions and the user's requests for the adapter and the full model, what each writes
# (quality.py), the adapter's HumanEval on all 164 (he.py), eval.py's columns, and the held-out
# columns of the page's quality table (longer/answers.py). Data: the human-written stdlib answers;
# with `mix`, the base's own greedy answers to 600 of the prompts (msn data self-distill, the cpu
# preset's sample) joined with as many human-written answers to other prompts (join.py); with
# `120`, gentle.sh's 120-step single-span model, exported and checked as the others; with `gpu1`,
# the GPU reference run's settings for its single-span model (batch 32 as 8 x 4 accumulated, max
# length 512, 20 warm-up steps, 430 steps: 13,756 samples, about 3 epochs; fp32 here), about 8.6 hours
# of this CPU, checkpointed every 10 steps (the last two kept), so several sessions can carry it.
# Each stage is skipped where its output is written, and the training and self-distillation
# continue where they stopped, so a rerun goes on where a kill stopped it.
#   bash span1-240.sh WORK [mix|120|gpu1]   (WORK: gentle.sh's scratch folder; run from the repository root)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EVAL=$(cd "$HERE/../../../cpu-levers" && pwd)/eval.py
QUALITY=$HERE/../longer/quality.py
HE=$HERE/../longer/he.py
W=${1:?usage: bash span1-240.sh WORK [mix|120|gpu1]}
source "$HERE/../human-setup.sh"
tag=1span-240 out=msn1-240 data=data/train.jsonl what="1 span" steps=240 save=60 full=1span-240-full
batch="--batch-size 4 --max-length 384 --warmup 0" keep=0
case "${2:-}" in
  "") ;;
  mix)
    tag=mix-1span-240 out=mix1-240 data=mix/train.jsonl what="1 span, own + human-written answers" full=mix-1span-240-full
    [ -f self600/info.json ] || msn data self-distill --model "$MODEL" --data data --out self600 --limit 600 \
      --max-new-tokens 320 --batch-size 16 --seed 42
    [ -f mix/train.jsonl ] || python "$HERE/join.py" self600 data mix ;;
  # gentle.sh's 120-step single-span model (msn1, the same settings; its full model's bench is gentle.sh's `1span`)
  120) tag=1span-120 out=msn1 steps=120 save=120 full=1span ;;
  gpu1)
    tag=gpu1-430 out=gpu1 what="1 span, the GPU reference's batch 32" steps=430 save=10 full=gpu1-430-full keep=2
    batch="--batch-size 8 --grad-accum 4 --max-length 512 --warmup 20" ;;
  *) echo "usage: bash span1-240.sh WORK [mix|120|gpu1]" >&2; exit 2 ;;
esac
[ -f "$out/msn_config.json" ] || msn train --model "$MODEL" --data "$data" --output-dir "$out" \
  $batch --seed 42 --lr 1e-4 --scheduler cosine \
  --noise-spans 1 --noise-len 5 --max-steps "$steps" --save-steps "$save" --save-total-limit "$keep" \
  --logging-steps 20 $(resume_flag "$out")
sed "s#\"$HOME/#\"~/#g" "$out/msn_config.json" > "$HERE/training-$tag.json"
[ -f "$out-lora/adapter_config.json" ] || msn export-lora --base "$MODEL" --tuned "$out" --out "$out-lora" --budget-mib 16
sed "s#\"$HOME/#\"~/#g" "$out-lora/export_report.json" > "$HERE/export-$tag.json"
bench "$out-lora" "$tag-adapter"
bench "$out" "$full"
python "$QUALITY" "$HERE/quality.json" run/own_words_questions.jsonl \
  "MSN, $what, all weights, lr 1e-4, $steps steps, as the 16 MiB adapter=$out-lora"
[ -f "he-adapter-$tag.json" ] || python "$HE" "$out-lora" "he-adapter-$tag.json"
cp "he-adapter-$tag.json" "$HERE/"
python "$EVAL" run "$out-lora" "$HERE/$out-lora.eval.json"
python "$HERE/ar_answers.py" "$HERE/answers-$tag.jsonl" "bench-heldout_questions_10x50-$tag-adapter" \
  "bench-own_words_questions-$tag-adapter"
python "$HERE/../longer/answers.py" run/heldout_questions_10x50.jsonl "$HERE"/answers-*.jsonl
