#!/usr/bin/env bash
# The two default-decoder lines of issue 36 on this machine: own words (own.py, the scoring
# msn reproduce does) for base and shipped adapter, two rounds alternating; then the held-out
# bench of the adapter (10 prompts, ar in the same run, cold), and of both on the requests.
# Run in a folder holding own.py (../explore/own.py), own_words_questions.jsonl
# (msn.bench.prompts.write_questions(path, CODE_REQUESTS, "code-request")) and heldout10.jsonl
# (src/msn/adapters/smollm2-msn-code/prompts.jsonl); the models from msn fetch.
set -u
# with msn's environment active (source .venv/bin/activate in the checkout)
M=~/.cache/msn/models
for r in 1 2; do
  for m in smollm2-135m-instruct smollm2-msn-code; do
    python own.py $M/$m own_words_questions.jsonl own-$m-r$r.json
  done
done
msn bench --model $M/smollm2-msn-code --bench heldout10.jsonl --methods ar,tr-jacobi --max-new-tokens 128 --warmup 1 --cold --dtype float32 --out bench-held10-adapter
msn bench --model $M/smollm2-135m-instruct --bench own_words_questions.jsonl --methods ar,tr-jacobi --max-new-tokens 128 --warmup 1 --cold --dtype float32 --out bench-own-base
msn bench --model $M/smollm2-msn-code --bench own_words_questions.jsonl --methods ar,tr-jacobi --max-new-tokens 128 --warmup 1 --cold --dtype float32 --out bench-own-adapter
