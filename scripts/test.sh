#!/usr/bin/env bash
# Set-up plus the tests (CPU): the default suite, then, when no arguments are given, the vLLM
# tests in their own environment (scripts/test-vllm.sh builds .venv-vllm once; MSN_SKIP_VLLM=1
# leaves them out). Extra arguments go to pytest and run the default suite alone. Without them
# the suite runs in MSN_TEST_WORKERS pytest-xdist workers of one thread each (default 2; with
# arguments, such as -m slow, whose tests have not been measured in workers, default 0: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKERS=${MSN_TEST_WORKERS:-$([ $# -eq 0 ] && echo 2 || echo 0)}
.venv/bin/python -m pytest -n "$WORKERS" --dist worksteal "$@"
if [ $# -eq 0 ] && [ "${MSN_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/test-vllm.sh
fi
