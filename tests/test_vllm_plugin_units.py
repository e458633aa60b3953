"""The vLLM plugin's pieces that need no vLLM: settings, the catalog of served names, the per-step routing and the
version gate (the engine itself is tested in tests/vllm_engine/, in the vLLM virtual environment)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_bundle, tiny_llama
from jdlora_vllm.catalog import AdapterRef, BundleCatalog, UnknownAdapterError
from jdlora_vllm.registration import check_vllm_version
from jdlora_vllm.routing import StepRouting, token_slots_from_mapping
from jdlora_vllm.settings import JDLoraVllmConfigError, JDVllmSettings

from peft_jdlora.bundle import save_bundle


def test_settings_from_additional_config():
    assert JDVllmSettings.from_additional_config({}) is None
    assert JDVllmSettings.from_additional_config({"other_plugin": 1}) is None
    settings = JDVllmSettings.from_additional_config(
        {"jdlora": {"bundles": ["org/bundle", {"path": "./b2", "name": "two", "revision": "abc"}]}}
    )
    assert [(b.source, b.name, b.revision) for b in settings.bundles] == [
        ("org/bundle", "bundle", None),
        ("./b2", "two", "abc"),
    ]
    assert settings.plain_lora_slots == 4
    parsed = JDVllmSettings.from_additional_config('{"jdlora": {"bundles": ["x"], "plain_lora_slots": 0}}')
    assert parsed.plain_lora_slots == 0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ([], "must be an object"),
        ({"bundle": ["x"]}, "unknown keys ['bundle']"),
        ({"bundles": "x"}, "must be a non-empty list"),
        ({"bundles": [3]}, "['bundles'][0] must be a folder"),
        ({"bundles": [{"path": "x", "nick": "y"}]}, "unknown keys ['nick']"),
        ({"bundles": [{"path": "x", "name": "a/b"}]}, "must not contain '/'"),
        ({"bundles": ["a/x", "b/x"]}, "both named ['x']"),
        ({"bundles": ["x"], "plain_lora_slots": -1}, "plain_lora_slots'] must be an integer >= 0"),
        ({"bundles": ["x"], "plain_lora_slots": True}, "must be an integer"),
    ],
)
def test_bad_settings_name_the_key(entry, message):
    with pytest.raises(JDLoraVllmConfigError) as info:
        JDVllmSettings.from_additional_config({"jdlora": entry})
    assert message in str(info.value)


@pytest.fixture
def catalog(tmp_path):
    model = tiny_llama()
    one = random_bundle(model, num_adapters=3)  # task_00, task_01, task_02
    two = random_bundle(model, num_adapters=2, seed=1)
    two.config.adapter_names = ["task_01", "solo"]
    save_bundle(one, tmp_path / "one")
    save_bundle(two, tmp_path / "two")
    settings = JDVllmSettings.from_additional_config(
        {"jdlora": {"bundles": [str(tmp_path / "one"), {"path": str(tmp_path / "two"), "name": "second"}]}}
    )
    return BundleCatalog.open(settings)


def test_catalog_resolves_requests_by_path_and_name(catalog, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert catalog.lookup("task_02", one) == AdapterRef(0, 2)
    assert catalog.lookup("task_01", two) == AdapterRef(1, 0)
    assert catalog.lookup("second/solo", two) == AdapterRef(1, 1)
    assert catalog.lookup("solo", str(tmp_path / "." / "two")) == AdapterRef(1, 1)  # the same folder spelled otherwise
    assert catalog.lookup("solo", "second") == AdapterRef(1, 1)  # the bundle's name as its path
    assert catalog.lookup("task_00", str(tmp_path)) is None  # not a configured bundle: an ordinary LoRA
    with pytest.raises(UnknownAdapterError, match=r"no adapter named 'task_2' in bundle .*Similar names: \['task_02'"):
        catalog.lookup("task_2", one)
    with pytest.raises(UnknownAdapterError, match="no adapter named 'one/solo'"):
        catalog.lookup("one/solo", two)


def test_catalog_served_names(catalog):
    assert catalog.is_ambiguous("task_01") and not catalog.is_ambiguous("solo")
    served = dict(catalog.served_names())
    assert served["task_00"] == AdapterRef(0, 0)
    assert "task_01" not in served  # in both bundles: served qualified only
    assert served["one/task_01"] == AdapterRef(0, 1) and served["second/task_01"] == AdapterRef(1, 0)
    assert served["solo"] == served["second/solo"] == AdapterRef(1, 1)
    assert catalog.resolve_name("second/task_01") == AdapterRef(1, 0)
    with pytest.raises(UnknownAdapterError, match=r"is in 2 configured bundles: name one of \['one/task_01'"):
        catalog.resolve_name("task_01")
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope'"):
        catalog.resolve_name("nope")


def test_catalog_refuses_what_is_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    for source, message in [
        (tmp_path / "missing", "neither a local folder nor a Hub repo id"),
        (tmp_path / "empty", "holds no adapter_config.json"),
    ]:
        settings = JDVllmSettings.from_additional_config({"jdlora": {"bundles": [str(source)]}})
        with pytest.raises(JDLoraVllmConfigError, match=message):
            BundleCatalog.open(settings)


def test_token_slots_from_mapping():
    slots = token_slots_from_mapping((0, 7, 7, 3, 0, 9), [3, None, 9, 7])
    assert slots.tolist() == [-1, 3, 3, 0, -1, 2]
    assert token_slots_from_mapping((0, 0), [None, None]).tolist() == [-1, -1]
    with pytest.raises(RuntimeError, match=r"LoRA ids \[5\] that hold no slot"):
        token_slots_from_mapping((5, 0), [3, None])


def test_step_routing_maps_tokens_to_bundle_adapters_and_pool_entries():
    routing = StepRouting(num_bundles=2, num_slots=4, pool_size=2, max_tokens=16, device=torch.device("cpu"))
    routing.point_slot_at_adapter(0, bundle=1, adapter=5)
    routing.point_slot_at_adapter(1, bundle=0, adapter=999)
    entry = routing.pool.assign(lora_id=42)
    routing.point_slot_at_pool(3, entry)
    routing.set_token_slots(torch.tensor([0, 0, -1, 1, 3, 3, -1]))
    assert routing.adapter_tokens(0, 7).tolist() == [-1, -1, -1, 999, -1, -1, -1]
    assert routing.adapter_tokens(1, 7).tolist() == [5, 5, -1, -1, -1, -1, -1]
    assert routing.pool_tokens(7).tolist() == [-1, -1, -1, -1, entry, entry, -1]
    # A forward padded past the step's tokens reads base rows there; a smaller next step leaves no stale entries.
    assert routing.adapter_tokens(1, 10)[7:].tolist() == [-1, -1, -1]
    routing.set_token_slots(torch.tensor([1, 2]))
    assert routing.adapter_tokens(0, 7).tolist() == [999, -1, -1, -1, -1, -1, -1]
    assert routing.adapter_tokens(1, 2) is None and routing.pool_tokens(2) is None  # nothing to compute on CPU
    routing.point_slot_at_pool(1, entry)  # re-pointing a slot clears what it pointed at
    assert routing.slot_adapter[:, 1].tolist() == [-1, -1]


def test_plain_lora_pool_is_bounded():
    routing = StepRouting(num_bundles=1, num_slots=4, pool_size=1, max_tokens=4, device=torch.device("cpu"))
    assert routing.pool.assign(7) == routing.pool.assign(7) == 0
    with pytest.raises(RuntimeError, match=r"plain_lora_slots=1 entries .* held by LoRAs \[7\]"):
        routing.pool.assign(8)
    routing.pool.release(7)
    assert routing.pool.assign(8) == 0


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "dev"])
def test_vllm_outside_the_tested_range_is_refused(version):
    with pytest.raises(RuntimeError, match=rf"supports vLLM >= 0.32, < 0.34 .* but vLLM {version} is installed"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1+cpu", "0.33.0"])
def test_vllm_in_the_tested_range(version):
    check_vllm_version(version)


def test_kernel_metadata_built_per_step_matches_the_forward(monkeypatch):
    """What runs on CUDA, here in the Triton interpreter: the routing builds the step's kernel metadata (for the
    step's tokens and the CUDA-graph size they pad to), and the op finds it for the token slots a layer passes."""
    from peft_jdlora import ops
    from peft_jdlora.ops import custom_ops

    if not ops.triton_available(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(ops, "_backend", "triton")
    gen = torch.Generator().manual_seed(0)
    routing = StepRouting(
        num_bundles=1, num_slots=4, pool_size=1, max_tokens=32, device=torch.device("cpu"), capture_sizes=[8, 16]
    )
    table = routing.cluster_table(0, torch.tensor([0, 1, 1, 0, 2]))
    U, V = torch.randn(3, 24, 16, generator=gen), torch.randn(3, 16, 20, generator=gen)
    sigma = torch.randn(5, 16, 16, generator=gen)
    for slot, adapter in enumerate([4, 1, 2]):
        routing.point_slot_at_adapter(slot, 0, adapter)
    calls = []
    dispatch = custom_ops._dispatch_jd_lora_delta  # the kernels (interpreted), with the metadata the op found

    def recording_dispatch(*args, metadata=None):
        calls.append(metadata)
        return dispatch(*args, metadata=metadata)

    monkeypatch.setattr(custom_ops, "_dispatch_jd_lora_delta", recording_dispatch)
    for step in (torch.tensor([0, 1, -1, 2, 2, 0]), torch.tensor([2, -1, 1, 0, 0, 1, 2])):
        routing.set_token_slots(step)
        for tokens in (step.numel(), 8):  # eager, then padded to the capture size
            x = torch.randn(tokens, 20, generator=gen)
            slots = routing.adapter_tokens(0, tokens)
            got = torch.ops.peft_jdlora.jd_lora_delta(x, slots, U, V, sigma, table)
            meta = calls[-1]
            assert meta is not None and meta.num_tokens == tokens
            assert meta.token_lora_mapping.tolist() == slots.tolist()
            torch.testing.assert_close(
                got, ops.jd_lora_delta(x, slots, U, V, sigma, table, backend="torch"), rtol=1e-5, atol=1e-4
            )
    custom_ops.clear_step_metadata()
