"""PEFT's own generic tuner tests, run on JDLORA the way PEFT runs them for its tuners (the fast subset of
`scripts/peft_conformance.py`; the full run and the behaviours that do not apply to a bundle are in
docs/peft_conformance.md). PEFT's tests come from its sdist on PyPI, fetched at test time, not from this repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "peft_conformance.py"
EXIT_NO_SDIST = 75


def test_peft_generic_tuner_tests_pass_on_jdlora(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path), "--subset", "fast"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode == EXIT_NO_SDIST:
        pytest.skip("the peft sdist (PEFT's tests) cannot be downloaded from PyPI here")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not summary["failures"]
    # Every generic test of the subset ran: a collection change (PEFT renaming a table) must not pass silently.
    assert summary["outcomes"]["passed"] >= 100 and summary["outcomes"]["xfailed (not applicable)"] == 9
