#!/usr/bin/env python
"""Run PEFT's generic tuner tests against the JDLORA tuner, the way PEFT runs them for each of its own tuners.

PEFT's tests ship in its sdist, not in the wheel. This script fetches the sdist of the installed PEFT version from
PyPI at run time (`pip download --no-deps --no-binary :all: peft==X`), unpacks its `tests/` into a work folder, and
runs them with `peft_conformance_plugin` (beside this file), which adds JDLORA rows to the tables PEFT's tests iterate
over and deselects every other tuner's rows. Nothing of PEFT's is copied into this repository.

PEFT's decoder tests load tiny random models from the Hub (`peft-internal-testing/tiny-random-OPTForCausalLM`, ...).
The Hub is not reachable here, so the script builds models of the same architectures from small configs (random
weights, seeded) into a private Hugging Face cache in the work folder and runs the tests offline against it.

    python scripts/peft_conformance.py                      # the full run (test_custom_models + test_decoder_models)
    python scripts/peft_conformance.py --subset fast        # the subset CI runs (a few minutes)
    python scripts/peft_conformance.py -- -k merge -x       # extra pytest arguments after `--`

It prints the pass/fail counts and writes `summary.json` and `summary.md` (counts, and every failure with its first
error line, grouped by test) into the work folder. The exit status is pytest's, or 75 when the sdist cannot be
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft-jdlora" / "peft-conformance"
TEST_FILES = {"custom": "tests/test_custom_models.py", "decoder": "tests/test_decoder_models.py"}
# Hub ids PEFT's decoder tests load, and the config of the tiny stand-in built for each.
DECODER_MODELS = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": (
        "OPTConfig",
        {"hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 16},
    ),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4}),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": (
        "GPTJConfig",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4},
    ),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": (
        "LlamaConfig",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "peft-internal-testing/tiny-dummy-qwen2": (
        "Qwen2Config",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8},
    ),
}
COMMON_MODEL_CONFIG = {
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAST_DECODER_MODEL = "trl-internal-testing/tiny-random-LlamaForCausalLM"  # as in peft_conformance_plugin
FAKE_COMMIT = "0" * 40
EXIT_NO_SDIST = 75  # EX_TEMPFAIL: PyPI unreachable, nothing was tested


def fetch_tests(version: str, work: Path) -> Path:
    """Unpack `tests/` of the peft `version` sdist into `work` (downloaded once) and return the sdist root."""
    root = work / f"peft-{version}"
    if (root / "tests" / "testing_common.py").is_file():
        return root
    work.mkdir(parents=True, exist_ok=True)
    sdist = work / f"peft-{version}.tar.gz"
    if not sdist.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"peft=={version}", "-d", str(work)], check=True)
    with tarfile.open(sdist) as archive:
        wanted = (f"peft-{version}/tests/", f"peft-{version}/pyproject")
        members = [m for m in archive.getmembers() if m.name.startswith(wanted)]
        archive.extractall(work, members=members, filter="data")
    # PEFT's tests import each other relatively (`from .testing_common import ...`): make the folder a package.
    (root / "tests" / "__init__.py").touch()
    return root


def build_offline_models(cache: Path, repo_ids: list[str]) -> None:
    """Tiny random models under PEFT's Hub ids, in a Hugging Face cache layout that offline loading resolves."""
    import torch
    import transformers

    for repo_id in repo_ids:
        config_name, sizes = DECODER_MODELS[repo_id]
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / FAKE_COMMIT
        if (snapshot / "config.json").is_file():
            continue
        config_cls = getattr(transformers, config_name)
        known = config_cls().to_dict()
        config = config_cls(**{k: v for k, v in COMMON_MODEL_CONFIG.items() if k in known}, **sizes)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(FAKE_COMMIT)


def summarise(junit_xml: Path) -> dict:
    outcomes: Counter = Counter()
    failures: dict[str, list[dict[str, str]]] = defaultdict(list)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else {"failure": "failed"}.get(problem.tag, problem.tag)
        if outcome == "skipped" and problem.get("type") == "pytest.xfail":
            outcome = "xfailed (not applicable)"
        outcomes[outcome] += 1
        if outcome in ("failed", "error"):
            name = case.get("name", "")
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures[name.split("[")[0]].append({"id": name, "message": message[0][:300] if message else ""})
    return {"outcomes": dict(outcomes), "total": sum(outcomes.values()), "failures": dict(failures)}


def write_summary(summary: dict, work: Path, title: str) -> None:
    (work / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    lines = [f"# {title}", "", "| outcome | tests |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary["outcomes"].items())]
    for test, cases in sorted(summary["failures"].items()):
        lines += ["", f"## {test} ({len(cases)})", ""]
        lines += [f"- `{c['id']}`: {c['message']}" for c in cases]
    (work / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"work folder (default {DEFAULT_WORK})")
    parser.add_argument("--subset", choices=("full", "fast"), default="full", help="full run, or the CI subset")
    parser.add_argument("--suites", default="custom,decoder", help="comma-separated: custom, decoder")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    import peft

    work = args.work.resolve()
    try:
        root = fetch_tests(peft.__version__, work)
    except subprocess.CalledProcessError:
        print(f"cannot download the peft {peft.__version__} sdist from PyPI (see pip's message above).")
        return EXIT_NO_SDIST
    cache = work / "hub-cache"
    build_offline_models(cache, [FAST_DECODER_MODEL] if args.subset == "fast" else list(DECODER_MODELS))
    files = [TEST_FILES[s.strip()] for s in args.suites.split(",") if s.strip()]
    junit = work / "results.xml"
    command = [
        sys.executable, "-m", "pytest", *files,
        "-c", str(root / "pyproject.toml"), "--rootdir", str(root), "-o", "addopts=", "-p", "no:cacheprovider",
        "-p", "peft_conformance_plugin", "-q", "-rN", f"--junitxml={junit}",
        # PEFT's pytest config turns transformers' FutureWarnings into errors, and PEFT 0.21.2 and its tests call
        # APIs that transformers 5 deprecates (`is_gradient_checkpointing`, `gradient_checkpointing_enable`): every
        # tuner would fail on those lines, which say nothing about the tuner.
        "-W", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
        "-W", "ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning",
    ]  # fmt: skip
    command += [f"--jdlora-subset={args.subset}"]
    command += args.pytest_args
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(root), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        # PEFT's hub_online_once() switches offline mode off for a model's first load: fail fast, then use the cache.
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    print("+", " ".join(command), flush=True)
    status = subprocess.run(command, cwd=root, env=env).returncode
    if junit.is_file():
        summary = summarise(junit)
        summary.update(peft_version=peft.__version__, subset=args.subset, suites=files, pytest_status=status)
        write_summary(summary, work, f"PEFT {peft.__version__} generic tuner tests on JDLORA ({args.subset})")
        print(json.dumps(summary["outcomes"]), f"-> {work / 'summary.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
