#!/usr/bin/env bash
# The prepared GPU run, one command (see benchmarks/gpu_check.py for the stages and what they write):
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR              # on the GPU machine: <= 6 minutes, results in RESULTS_DIR
#   bash benchmarks/gpu_check.sh RESULTS_DIR --dry-run    # CPU rehearsal (Triton interpreter, tiny shapes)
#
# Runs with the Python that holds torch (python3 on the GPU image, the activated venv here; JDLORA_GPU_PYTHON
# overrides it). Packages the image lacks come from .gpu_wheels/ (bash benchmarks/gpu_check_wheels.sh makes it).
# Exit status: 0 when every stage passed; 1 when one failed (the results folder says which); 2 on bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${JDLORA_GPU_PYTHON:-python3}"
exec env PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_check.py "$@"
