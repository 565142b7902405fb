#!/usr/bin/env bash
# MSN vs plain SFT on SmolLM2-135M-Instruct with the stdlib code set, end to end.
# Usage: bash recipes/smollm2-code.sh [gpu|cpu|pilot|smoke|ablation] [OUT]   (rerun to continue an interrupted run)
# Without network (a borrowed GPU machine): scripts/gpu_reproduce.sh, see DEVELOPERS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/msn reproduce --preset "${1:-cpu}" --out "${2:-runs/smollm2-code}"
