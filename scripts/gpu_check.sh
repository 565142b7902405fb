#!/usr/bin/env bash
# The device check, on one H100/H200 with no network (see scripts/gpu_check.py for what it measures).
# The SmolLM2 GGUF travels in two parts: the first call copies part one (and the gguf wheel) to
# /tmp; the second brings part two and runs this script, which joins them.
#   split -n 2 -d SmolLM2-135M-Instruct.Q4_1.gguf smollm2.gguf.part     # here, once
#   bash scripts/gpu_check.sh /tmp/smollm2.gguf.part00 smollm2.gguf.part01 [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${3:-${OUT:-gpu_check.json}}
cat "$1" "$2" > /tmp/smollm2.gguf
if ! python -c "import gguf" 2>/dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site /tmp/gguf-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
timeout 330 python scripts/gpu_check.py --gguf /tmp/smollm2.gguf --out "$OUT" --device cuda
