"""Fixtures of the whole suite: the process set up for tests (Triton interpreter, Hub off, one torch thread). What the
tests share besides fixtures (tiny models built from configs, hand-made bundles, ...) is in helpers.py, imported
explicitly."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run on CPU tensors in the interpreter
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

# Tiny models: one thread is fastest, and CI shares 2 cores with the test runner. Set at import for collection and
# module-scoped fixtures; `one_thread` sets it again for every test.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one torch thread, also after a test that ran a benchmark's main with --threads: a second
    OpenMP thread only adds synchronisation on these problems (and spins against other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def restore_process_state():
    """For modules that run the commands in this process: undo what --quiet / --offline switch on for a CLI process
    (environment variables, huggingface_hub's progress bars)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    environ, bars_disabled = dict(os.environ), are_progress_bars_disabled()
    yield
    os.environ.clear()
    os.environ.update(environ)
    if not bars_disabled:
        enable_progress_bars()
