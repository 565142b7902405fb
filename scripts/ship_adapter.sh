#!/usr/bin/env bash
# Ships what a reproduction returned (scripts/gpu_reproduce.sh from the GPU machine, or
# `python -c 'from msn.experiments.reproduce import collect; ...'` after `msn reproduce --preset cpu`):
# the results under docs/results/smollm2-code-PRESET-preset/ and the MSN adapter in
# src/msn/adapters/smollm2-msn-code/ (its weights joined from their parts), then fetches the merged
# model and runs the demo, which now puts it beside the base model on held-out code prompts.
#   bash scripts/ship_adapter.sh RETURNED [DEMO_ARGS...]     (RETURNED: the folder holding results.json)
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?usage: bash scripts/ship_adapter.sh RETURNED_FOLDER [demo args]}
shift
[ -f "$R/results.json" ] && [ -f "$R/adapter/adapter_config.json" ] || {
  echo "ship_adapter: $R holds no results.json and adapter/ (what gpu_reproduce.sh returns)" >&2; exit 2; }
A=src/msn/adapters/smollm2-msn-code
PRESET=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['config']['preset'])" "$R/results.json")
D=docs/results/smollm2-code-$PRESET-preset
mkdir -p "$D" "$A"
rm -f "$A"/adapter_model.safetensors
cp "$R/results.json" "$R/results.md" "$D/"
for extra in curve.png acceptance.png; do [ -f "$R/$extra" ] && cp "$R/$extra" "$D/"; done
cp "$R"/adapter/*.json "$R"/adapter/*.jsonl "$R/adapter/README.md" "$A/"
cat "$R"/adapter/adapter_model.safetensors.part* > "$A/adapter_model.safetensors"
bash scripts/setup.sh
.venv/bin/python -c "from safetensors import safe_open; safe_open('$A/adapter_model.safetensors', 'pt').keys()"
.venv/bin/msn fetch smollm2-msn-code
exec bash scripts/demo.sh --out "$D/demo-cpu.json" "$@"
