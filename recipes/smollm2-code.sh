#!/usr/bin/env bash
# MSN vs plain SFT on SmolLM2-135M-Instruct with the stdlib code set, end to end.
# Usage: bash recipes/smollm2-code.sh [cpu|gpu] [OUT]   (rerun to continue an interrupted run)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/msn reproduce --preset "${1:-cpu}" --out "${2:-runs/smollm2-code}"
