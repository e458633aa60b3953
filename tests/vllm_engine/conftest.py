"""vLLM plugin tests: they run in the vLLM virtual environment (scripts/test_vllm.sh) and are skipped elsewhere.

vLLM reads these before it is imported: one engine process per test module (in-process engine core), one OpenMP
thread without CPU binding, loopback only, no Hub.
"""

from __future__ import annotations

import os

for key, value in {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)
