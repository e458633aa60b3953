#!/usr/bin/env bash
# Set up a virtual environment (CPU torch 2.13.0 first, then the package with its test extras) and run the checks:
# ruff and the pytest suite, then the vLLM plugin's tests (scripts/test_vllm.sh). Usage: bash scripts/test.sh
# [pytest args...] (with arguments: only that pytest run)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
. scripts/venv.sh test
python -c "import torch, peft, transformers, triton; print('torch', torch.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
ruff check .
ruff format --check . || { echo "ruff format: run 'ruff format .'"; exit 1; }
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 OMP_NUM_THREADS=2
python -m pytest -q -p no:cacheprovider "$@"
# With no pytest arguments, the whole suite: also the vLLM plugin's tests, in their own virtual environment
# (JDLORA_SKIP_VLLM=1 skips them).
if [ "$#" -eq 0 ] && [ "${JDLORA_SKIP_VLLM:-0}" != "1" ]; then
    deactivate
    bash scripts/test_vllm.sh
fi
