"""pytest plugin: run PEFT's own generic tuner tests (from the peft sdist) with JDLORA rows, as PEFT adds a tuner's.

Loaded by `scripts/peft_conformance.py` (`-p peft_conformance_plugin`); nothing here is copied from PEFT. It

- puts JDLORA rows into the parameter tables PEFT's tests iterate over for every tuner (`TEST_CASES` of
  test_custom_models.py, `ALL_CONFIGS` of test_decoder_models.py), exactly where a tuner's own rows would be, in
  place of the other tuners' rows;
- deselects every other tuner's rows (the run tests JDLORA, not PEFT),
- marks the generic behaviours that do not apply to a bundle as strict xfails, each with the reason
  (docs/peft_conformance.md): if one starts to pass, the run fails and the list must be updated, and
- stands in for `diffusers` when it is not installed (only PEFT's Stable Diffusion tests use it; none run here), and
- keeps PEFT's `hub_online_once` offline: the Hub is not reachable, and the models it would fetch are in the local
  cache that `peft_conformance.py` builds (otherwise every first load retries the network for half a minute).

A JDLORA row is a bundle of two adapters whose unlabelled rows use the second one (`default_adapter`), so that PEFT's
tests, which never pass `adapter_ids`, exercise an adapter and not the base model.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

import peft_jdlora
from peft_jdlora import JDLoraConfig

BUNDLE = {"adapter_names": ["first", "second"], "default_adapter": "second"}

# (test name, custom model id, config class, config kwargs): the layout of PEFT's test_custom_models.TEST_CASES.
CUSTOM_ROWS = [
    ("Vanilla MLP 1 JDLoRA", "MLP", JDLoraConfig, {"target_modules": "lin0", **BUNDLE}),
    ("Vanilla MLP 2 JDLoRA", "MLP", JDLoraConfig, {"target_modules": ["lin0"], **BUNDLE}),
    ("Vanilla MLP 3 JDLoRA", "MLP", JDLoraConfig, {"target_modules": ["lin1"], **BUNDLE}),
    ("Vanilla MLP 4 JDLoRA", "MLP", JDLoraConfig, {"target_modules": ["lin0", "lin1"], **BUNDLE}),
    ("Vanilla MLP 5 JDLoRA diag", "MLP", JDLoraConfig, {"target_modules": ["lin0"], "sigma_type": "diag", **BUNDLE}),
    (
        "Vanilla MLP 6 JDLoRA clusters",
        "MLP",
        JDLoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 4, "num_clusters": 2, "adapter_clusters": [1, 0], **BUNDLE},
    ),
    ("Embedding + transformers Conv1D 1 JDLoRA", "EmbConv1D", JDLoraConfig, {"target_modules": ["conv1d"], **BUNDLE}),
]

# (config class, config kwargs): the layout of PEFT's test_decoder_models.ALL_CONFIGS.
DECODER_ROWS = [
    (JDLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "r": 8, **BUNDLE}),
    (
        JDLoraConfig,
        {
            "task_type": "CAUSAL_LM",
            "target_modules": None,
            "r": 4,
            "sigma_type": "diag",
            "num_clusters": 2,
            "adapter_clusters": [1, 0],
            **BUNDLE,
        },
    ),
]

ROW_TABLES = {"TEST_CASES": CUSTOM_ROWS, "ALL_CONFIGS": DECODER_ROWS}

# The fast subset (what CI runs): every generic test on one custom-model row with two layers, the Conv1D row, and the
# first decoder row on one architecture.
FAST_CUSTOM_ROWS = {"Vanilla MLP 4 JDLoRA", "Embedding + transformers Conv1D 1 JDLoRA"}
FAST_DECODER_MODEL = "trl-internal-testing/tiny-random-LlamaForCausalLM"


def _stand_in_for_diffusers() -> None:
    if importlib.util.find_spec("diffusers") is not None:
        return
    stub = types.ModuleType("diffusers")

    class StableDiffusionPipeline:  # PEFT's testing_common imports the name; only its SD tests use it
        def __init__(self, *args, **kwargs):
            raise RuntimeError("diffusers is not installed: the Stable Diffusion tests do not run here.")

    stub.StableDiffusionPipeline = StableDiffusionPipeline
    sys.modules["diffusers"] = stub


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--jdlora-subset", choices=("full", "fast"), default="full", help="JDLORA rows: all, or the fast CI subset"
    )


def pytest_configure(config: pytest.Config) -> None:
    peft_jdlora.register()
    _stand_in_for_diffusers()


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Put the JDLORA rows into the module's tables before pytest expands the parametrize marks that hold them. The
    other tuners' rows are taken out here already (they would be deselected anyway): collection stays short."""
    module = metafunc.module
    if getattr(module, "_jdlora_rows_added", False):
        return
    for table_name, rows in ROW_TABLES.items():
        table = getattr(module, table_name, None)
        if isinstance(table, list):
            table[:] = rows
    module._jdlora_rows_added = True


def _is_jdlora_item(item: pytest.Item, fast: bool) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None or callspec.params.get("config_cls") is not JDLoraConfig:
        return False
    if not fast:
        return True
    params = callspec.params
    if "test_name" in params:
        return params["test_name"] in FAST_CUSTOM_ROWS
    return params.get("model_id") == FAST_DECODER_MODEL and params.get("config_kwargs") is DECODER_ROWS[0][1]


class _EveryModelSeen(dict):
    """`testing_utils._HUB_MODEL_ACCESSES` that counts every model id as fetched before: offline from the start."""

    def __contains__(self, model_id: object) -> bool:
        return True

    def __missing__(self, model_id: str) -> int:
        return 0


def _not_applicable(item: pytest.Item) -> str | None:
    """Why a generic test does not apply to a JD-LoRA bundle, or None."""
    name, params = item.originalname, item.callspec.params
    if name == "test_adapter_dtype_autocast" and params.get("autocast_adapter_dtype"):
        if params.get("dtype") in (torch.float16, torch.bfloat16):
            return (
                "a bundle loaded for inference keeps the dtype of the layers it patches (PEFT upcasts adapter "
                "weights to fp32): thousands of adapters are served in the compact dtype"
            )
    if name == "test_parameters_after_loading_model" and params.get("test_name") == "Vanilla MLP 4 JDLoRA":
        return (
            "the test's SGD at lr 0.5 on inputs up to 89 diverges in 3 steps (LoRA reaches 1e20 too); this row reaches "
            "NaN, and loading refuses a bundle holding NaN, as it must"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").endswith("testing_utils") and hasattr(module, "_HUB_MODEL_ACCESSES"):
            module._HUB_MODEL_ACCESSES = _EveryModelSeen()
    fast = config.getoption("--jdlora-subset") == "fast"
    keep = [item for item in items if _is_jdlora_item(item, fast)]
    dropped = [item for item in items if not _is_jdlora_item(item, fast)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    for item in keep:
        reason = _not_applicable(item)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=f"not applicable to a bundle: {reason}", strict=True))
