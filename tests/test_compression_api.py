"""The compression API end to end: PEFT LoRA folders -> bundle -> PeftModel, report, project, remove, evaluate."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from peft_jdlora.bundle import load_bundle, save_bundle
from peft_jdlora.compression import AdapterReadError, compress, evaluate, project, read_lora_adapter, remove
from peft_jdlora.compression.synthetic import SyntheticSource

F64 = torch.float64
MODULES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (12, 20), "layers.1.q_proj": (24, 20)}


def save_lora(path, model_fn=tiny_llama, seed=0, **config):
    torch.manual_seed(seed)
    config.setdefault("lora_alpha", 8)
    model = get_peft_model(model_fn(), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def llama_loras(tmp_path_factory):
    """Three real PEFT LoRA folders for tiny Llama: mixed ranks, rsLoRA, rank/alpha patterns, different modules."""
    root = tmp_path_factory.mktemp("loras")
    return [
        save_lora(root / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=1),
        save_lora(root / "rs", r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"], seed=2),
        save_lora(
            root / "pat",
            r=2,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"model.layers.1.self_attn.q_proj": 6},
            alpha_pattern={"up_proj": 1},
            seed=3,
        ),
    ]


def peft_logits(model_fn, folder, input_ids):
    with torch.no_grad():
        return PeftModel.from_pretrained(model_fn(), folder)(input_ids=input_ids).logits


@pytest.mark.parametrize(("method", "sigma", "clusters"), [("jd", "full", 1), ("jd", "full", 2), ("svd", "full", 1)])
def test_lossless_bundle_serves_the_same_logits_as_peft_lora(tmp_path, llama_loras, method, sigma, clusters):
    bundle = compress(llama_loras, rank=32, method=method, sigma=sigma, clusters=clusters, progress=False)
    assert bundle.report.overall.mean_error < 1e-6
    save_bundle(bundle, tmp_path / "bundle")
    assert (tmp_path / "bundle" / "jdlora_report.json").is_file()
    served = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "bundle"))
    input_ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = served(input_ids=input_ids, adapter_ids=["qv", "rs", "pat", None]).logits
        base = tiny_llama()(input_ids=input_ids[3:]).logits
    for row, folder in enumerate(llama_loras):
        torch.testing.assert_close(
            logits[row], peft_logits(tiny_llama, folder, input_ids[row : row + 1])[0], atol=1e-4, rtol=0
        )
    torch.testing.assert_close(logits[3], base[0], atol=1e-5, rtol=0)
    # The test can fail: the adapters change the logits visibly.
    assert (logits[0] - base[0]).abs().max() > 1e-2


def test_gpt2_conv1d_bundle_serves_the_same_logits(tmp_path):
    folders = [
        save_lora(tmp_path / f"g{i}", model_fn=tiny_gpt2, r=4, target_modules=["c_attn", "c_proj"], seed=i)
        for i in range(2)
    ]
    bundle = compress(folders, rank=8, progress=False)
    assert bundle.config.fan_in_fan_out
    save_bundle(bundle, tmp_path / "bundle")
    served = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "bundle"))
    input_ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = served(input_ids=input_ids, adapter_ids=["g1", "g0"]).logits
    torch.testing.assert_close(logits[0], peft_logits(tiny_gpt2, folders[1], input_ids[:1])[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1], peft_logits(tiny_gpt2, folders[0], input_ids[1:])[0], atol=1e-4, rtol=0)


def test_report_schema_and_sizes(tmp_path, llama_loras):
    bundle = compress(llama_loras, rank=4, sigma="diag", dtype=torch.bfloat16, progress=False)
    report = bundle.report
    assert report.method == "jd-diag" and report.sigma_type == "diag" and report.rank == 4
    assert report.num_clusters == 1 and set(report.iterations) >= {"jd_full", "jd_diag", "cluster_passes"}
    assert isinstance(report.seconds, float) and report.device == "cpu"
    assert set(report.per_adapter) == {"qv", "rs", "pat"}
    for entry in report.per_adapter.values():
        assert None not in (entry.mean_error, entry.max_error, entry.cluster) and entry.modules
        assert entry.mean_error == pytest.approx(sum(entry.modules.values()) / len(entry.modules))
    worst = max(report.per_adapter, key=lambda n: report.per_adapter[n].mean_error)
    assert report.overall.worst_adapter == worst
    assert report.overall.worst_error == report.per_adapter[worst].mean_error
    # Sizes: the original LoRA parameters counted from the folders, the bundle's from its tensors.
    original = 0
    for folder in llama_loras:
        for d_out, d_in, r in read_lora_adapter(folder).shapes().values():
            original += r * (d_out + d_in)
    stored = sum(f.U.numel() + f.V.numel() + f.sigma.numel() for f in bundle.modules.values())
    saved = report.to_dict()
    assert saved["params"] == {"original": original, "bundle": stored, "ratio": pytest.approx(original / stored)}
    assert saved["bytes"] == {"original": 4 * original, "bundle": 2 * stored, "dtype": "bfloat16"}
    assert all(f.U.dtype == torch.bfloat16 for f in bundle.modules.values())
    # Provenance in the config; the report survives a save / load round trip as JSON.
    assert [s["source"] for s in bundle.config.adapter_sources] == llama_loras
    assert bundle.config.adapter_sources[1]["use_rslora"] is True
    save_bundle(bundle, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "jdlora_report.json").read_text()) == report.to_dict()
    assert load_bundle(tmp_path / "b").report == report


def test_evaluate_equals_the_report(llama_loras):
    bundle = compress(llama_loras, rank=3, clusters=2, progress=False)
    adapters = [read_lora_adapter(f) for f in llama_loras]
    evaluation = evaluate(bundle, adapters)
    for name, entry in bundle.report.per_adapter.items():
        assert evaluation.per_adapter[name].cluster == entry.cluster
        for module, error in entry.modules.items():
            assert evaluation.per_adapter[name].modules[module] == pytest.approx(error, abs=1e-5)
    assert evaluation.overall.worst_adapter == bundle.report.overall.worst_adapter
    with pytest.raises(KeyError, match="no adapter named"):
        evaluate(bundle, [read_lora_adapter(llama_loras[0], name="unknown")])


def synthetic_adapters(seed=0, num_adapters=6):
    source = SyntheticSource(MODULES, num_adapters, lora_rank=4, kind="families", noise=0.3, dtype=F64, seed=seed)
    return source.adapters()


@pytest.mark.parametrize(
    ("method", "sigma", "clusters"),
    [("jd", "full", 1), ("jd", "diag", 1), ("jd", "full", 2), ("jd", "diag", 2), ("svd", "full", 1)],
)
def test_projecting_a_member_reproduces_its_fitted_core(method, sigma, clusters):
    adapters = synthetic_adapters()
    bundle = compress(adapters, rank=5, method=method, sigma=sigma, clusters=clusters, progress=False)
    member = adapters[4]
    copy = type(member)(name="copy", modules=member.modules, base_model=member.base_model, dtype=member.dtype)
    grown = project(bundle, [copy], progress=False)
    grown.validate()
    slot, new = bundle.config.adapter_names.index(member.name), grown.config.resolve_adapter("copy")
    assert new == bundle.config.num_adapters
    if method == "svd":  # a new singleton cluster with the same truncated SVD
        assert grown.config.num_clusters == bundle.config.num_clusters + 1
    else:
        assert grown.config.adapter_clusters[new] == bundle.config.adapter_clusters[slot]
    for module in bundle.modules:
        torch.testing.assert_close(
            grown.modules[module].sigma[new], bundle.modules[module].sigma[slot], atol=1e-10, rtol=0
        )
        torch.testing.assert_close(
            grown.delta_weight(module, "copy"), bundle.delta_weight(module, member.name), atol=1e-10, rtol=0
        )
    entry = grown.report.per_adapter["copy"]
    assert entry.mean_error == pytest.approx(bundle.report.per_adapter[member.name].mean_error, abs=1e-10)
    assert entry.projected is True and grown.report.projected == ["copy"]
    assert grown.report.size.params_original == bundle.report.size.params_original + member.num_params
    # The input bundle is unchanged.
    assert bundle.config.num_adapters == 6 and "copy" not in bundle.report.per_adapter


def test_projection_refusals(tmp_path, llama_loras):
    bundle = compress(llama_loras[:1], rank=4, progress=False)
    with pytest.raises(AdapterReadError, match="already has an adapter named 'qv'"):
        project(bundle, [llama_loras[0]], progress=False)
    with pytest.raises(AdapterReadError, match="which the bundle lacks"):
        project(bundle, [llama_loras[1]], progress=False)
    bundle.config.base_model_name_or_path = "org/base"
    other = read_lora_adapter(llama_loras[0], name="other")
    other.base_model = "org/other"
    with pytest.raises(AdapterReadError, match="trained on 'org/other'"):
        project(bundle, [other], progress=False)


def test_remove_drops_rows_and_empty_clusters(tmp_path):
    adapters = synthetic_adapters(num_adapters=4)
    bundle = compress(adapters, rank=4, clusters=2, progress=False)
    clusters, names = bundle.config.adapter_clusters, bundle.config.adapter_names
    assert bundle.config.num_clusters == 2
    # Remove every member of the smaller cluster: its bases go, the other cluster is renumbered 0 if needed.
    smallest = min((0, 1), key=clusters.count)
    gone = [n for n, c in zip(names, clusters) if c == smallest]
    smaller = remove(bundle, gone)
    smaller.validate()
    kept = [n for n in names if n not in gone]
    assert smaller.config.adapter_names == kept and smaller.config.num_clusters == 1
    assert smaller.config.adapter_clusters == [0] * len(kept)
    for module, f in smaller.modules.items():
        assert f.U.shape[0] == 1
        for name in kept:
            torch.testing.assert_close(smaller.delta_weight(module, name), bundle.delta_weight(module, name))
    assert set(smaller.report.per_adapter) == set(kept) and smaller.report.removed == gone
    removed_params = sum(a.num_params for a in adapters if a.name in gone)
    assert smaller.report.size.params_original == bundle.report.size.params_original - removed_params
    assert smaller.report.num_clusters == 1
    save_bundle(smaller, tmp_path / "smaller")
    # Removing and projecting back gives the same cores (no refit either way).
    back = project(remove(bundle, [kept[0]]), [a for a in adapters if a.name == kept[0]], progress=False)
    for module in bundle.modules:
        torch.testing.assert_close(back.delta_weight(module, kept[0]), bundle.delta_weight(module, kept[0]))
    with pytest.raises(KeyError, match="no adapters named"):
        remove(bundle, ["nope"])
    with pytest.raises(ValueError, match="empty bundle"):
        remove(bundle, names)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "pca"}, "method must be"),
        ({"sigma": "block"}, "sigma must be"),
        ({"rank": 0}, "rank must be"),
        ({"clusters": 0}, "clusters must be"),
        ({"clusters": "auto"}, "needs target_error"),
        ({"clusters": 2, "target_error": 0.1}, "target_error is used with clusters='auto'"),
        ({"method": "svd", "clusters": 2}, "clusters do not apply"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress(synthetic_adapters(), progress=False, **kwargs)


def test_progress_bars(capsys):
    compress(synthetic_adapters(), rank=4, progress=True)
    assert "JD-Full" in capsys.readouterr().err


def mixed_bundle(adapters):
    """A bundle mixing per-module layouts, as budget plans write them: one module stored as per-adapter SVD
    (cluster_pattern: a singleton cluster per adapter, sigma_pattern: diag), the others as a 2-cluster JD-Full."""
    from peft_jdlora.bundle import Bundle
    from peft_jdlora.compression.api import _replace_config

    joint = compress(adapters, rank=5, clusters=2, progress=False)
    svd = compress(adapters, rank=3, method="svd", progress=False)
    special = "layers.0.v_proj"
    modules = {m: (svd.modules[m] if m == special else f) for m, f in joint.modules.items()}
    config = _replace_config(
        joint.config,
        rank_pattern={m: f.U.shape[-1] for m, f in modules.items()},
        cluster_pattern={special: list(range(len(adapters)))},
        sigma_pattern={special: "diag"},
    )
    bundle = Bundle(config=config, modules=modules)
    bundle.validate()
    return bundle, special


def test_projecting_into_a_plan_whose_default_layout_is_per_adapter_svd():
    """Unrelated adapters: the default plan stores most modules as per-adapter SVD, so its default group (no
    cluster_pattern entry) is the singleton-cluster layout. A new adapter must get its own truncated SVD there, not be
    squeezed into another adapter's basis."""
    source = SyntheticSource(MODULES, 6, lora_rank=4, kind="random", dtype=F64, seed=5)
    adapters = source.adapters()
    bundle = compress(adapters[:5], budget="r4", cluster_counts=(), progress=False)
    svd_modules = [m for m, entry in bundle.report.plan.items() if entry["kind"] == "svd"]
    assert svd_modules and any(bundle.config.pattern_key(bundle.config.cluster_pattern, m) is None for m in svd_modules)
    grown = project(bundle, [adapters[5]], progress=False)
    grown.validate()
    new = adapters[5]
    for module in svd_modules:
        assert grown.config.clusters_for(module)[-1] == 5 and grown.modules[module].U.shape[0] == 6
        rank = bundle.modules[module].U.shape[-1]
        u, s, vh = torch.linalg.svd(new.delta_weight(module).to(F64))
        truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]  # the best rank-r approximation (brute force)
        torch.testing.assert_close(grown.delta_weight(module, new.name).to(F64), truncated, atol=1e-8, rtol=1e-6)
    for old in adapters[:5]:  # the others are untouched
        for module in bundle.modules:
            torch.testing.assert_close(grown.delta_weight(module, old.name), bundle.delta_weight(module, old.name))


def test_project_remove_evaluate_with_per_module_layouts():
    adapters = synthetic_adapters(seed=2)
    bundle, special = mixed_bundle(adapters)
    evaluation = evaluate(bundle, adapters)
    for adapter in adapters:
        for module in adapter.modules:
            dense = adapter.delta_weight(module)
            expected = float((dense - bundle.delta_weight(module, adapter.name)).square().sum() / dense.square().sum())
            assert evaluation.per_adapter[adapter.name].modules[module] == pytest.approx(expected, abs=1e-10)

    member = adapters[3]
    copy = type(member)(name="copy", modules=member.modules, base_model=member.base_model, dtype=member.dtype)
    grown = project(bundle, [copy], progress=False)
    grown.validate()
    assert grown.config.clusters_for(special)[-1] == 6  # its own SVD cluster
    assert grown.modules[special].U.shape[0] == 7
    for module in bundle.modules:
        torch.testing.assert_close(
            grown.delta_weight(module, "copy"), bundle.delta_weight(module, member.name), atol=1e-10, rtol=0
        )
        if module != special:
            assert grown.config.clusters_for(module)[-1] == bundle.config.clusters_for(module)[3]

    smaller = remove(grown, [adapters[0].name, "copy"])
    smaller.validate()
    assert smaller.modules[special].U.shape[0] == 5 and smaller.config.clusters_for(special) == list(range(5))
    for adapter in adapters[1:]:
        for module in bundle.modules:
            torch.testing.assert_close(
                smaller.delta_weight(module, adapter.name), bundle.delta_weight(module, adapter.name)
            )
