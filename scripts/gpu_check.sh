#!/usr/bin/env bash
# The device check, on one H100/H200 with no network, in two calls (scripts/gpu_check.py says
# what each part measures). The SmolLM2 GGUF travels in two parts (each call carries at most
# 64 MiB), prepared here once:
#   mkdir -p runs/carry1/smollm2-config runs/carry2
#   split -n 2 -d SmolLM2-135M-Instruct.Q4_1.gguf runs/carry1/smollm2.gguf.part
#   mv runs/carry1/smollm2.gguf.part01 runs/carry2/
#   cp gguf-*.whl runs/carry1/; cp SMOLLM2_DIR/config.json runs/carry1/smollm2-config/
#   cp ../shared/data/spec_bench/question.jsonl runs/carry2/       # ../shared does not travel
# Call 1 (carry runs/carry1): keeps part one and the wheel in /tmp, then checks what needs no
# weights: lossless on six tiny families (graphs on and off) and the t(n) ladders of a
# random-weight SmolLM2 (same shapes, same cost).
#   bash scripts/gpu_check.sh first runs/carry1 $OUT
# Call 2 (carry runs/carry2, within 30 s while the machine is warm): joins the model and runs
# the bench, bf16 agreement and the hf-static baseline.
#   bash scripts/gpu_check.sh second runs/carry2/smollm2.gguf.part01 $OUT
# Call 3 (no carry, while the machine is still warm: it reuses the model call 2 joined in /tmp):
# compiled steps against transformers' compiled static-cache generate, t(n) at Llama-3.2-1B and
# Llama-3-8B shapes (random bfloat16 weights) and the projection table, at most 6 minutes.
#   bash scripts/gpu_check.sh compiled $OUT
# Call 4 (no carry, while still warm, after call 2): the shipped smollm2-msn-code adapter against
# the base on the code requests in a user's own words (issue 36), about 2 minutes.
#   bash scripts/gpu_check.sh own $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
case "${1:-}" in
  first)
    cp "$2"/smollm2.gguf.part00 "$2"/gguf-*.whl /tmp/
    mkdir -p "$3"
    timeout "${LIMIT:-240}" python scripts/gpu_check.py --config "$2/smollm2-config" --parts lossless,latency,profile \
      --out "$3/gpu_check-1.json"
    ;;
  second)
    cat /tmp/smollm2.gguf.part00 "$2" > /tmp/smollm2.gguf
    cp "$(dirname "$2")/question.jsonl" /tmp/question.jsonl
    if ! python -c "import gguf" 2>/dev/null; then
      pip install -q --no-index --no-deps --target /tmp/site /tmp/gguf-*.whl
      export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    mkdir -p "$3"
    timeout "${LIMIT:-500}" python scripts/gpu_check.py --gguf /tmp/smollm2.gguf --parts bench,bf16,hf_static \
      --questions "$(dirname "$2")/question.jsonl" \
      --out "$3/gpu_check-2.json"
    ;;
  compiled)
    if ! python -c "import gguf" 2>/dev/null; then
      export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    mkdir -p "$2"
    timeout "${LIMIT:-360}" python scripts/gpu_check.py --gguf /tmp/smollm2.gguf --parts shapes,compiled \
      --questions /tmp/question.jsonl --out "$2/gpu_check-compiled.json" --projection "$2/gpu-compiled-projection.md"
    ;;
  own)
    if ! python -c "import gguf" 2>/dev/null; then
      export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    mkdir -p "$2"
    timeout "${LIMIT:-300}" python scripts/gpu_check.py --gguf /tmp/smollm2.gguf --parts own_words \
      --out "$2/gpu_check-own.json"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh first CARRY1_DIR OUT_DIR | second PART01_FILE OUT_DIR | compiled OUT_DIR | own OUT_DIR" >&2
    exit 2
    ;;
esac
