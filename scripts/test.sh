#!/usr/bin/env bash
# Set-up plus the tests (CPU): the default suite, then, when no arguments are given, the vLLM
# tests in their own environment (scripts/test-vllm.sh builds .venv-vllm once; MSN_SKIP_VLLM=1
# leaves them out). Extra arguments go to pytest and run the default suite alone. The suite runs
# in MSN_TEST_WORKERS processes (pytest-xdist, default 2, one thread each; 0: in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -n "${MSN_TEST_WORKERS:-2}" --dist worksteal "$@"
if [ $# -eq 0 ] && [ "${MSN_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/test-vllm.sh
fi
