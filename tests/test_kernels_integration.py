"""The kernels inside peft-jdlora (backend dispatch, a whole model through the kernels, metadata built once per
batch) and as a Hugging Face kernel (build.toml, the noarch build layout, `kernels.get_local_kernel`, TGI's
importable-module-first convention)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import jdlora_kernels
import pytest
import torch
from helpers import random_bundle, tiny_llama
from peft import PeftModel

from peft_jdlora import ops, save_bundle

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels"
KERNEL_SOURCE = KERNEL_DIR / "torch-ext" / "jdlora_kernels"


def _has_kernels_library() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Hugging Face's `kernels` comes with the test extra; a GPU image may lack it (there the rest of the file still runs).
needs_kernels_library = pytest.mark.skipif(
    not _has_kernels_library(), reason="Hugging Face's `kernels` is not installed"
)
needs_interpreter = pytest.mark.skipif(
    not jdlora_kernels.INTERPRETED, reason="runs the kernels on CPU tensors, which needs TRITON_INTERPRET=1"
)


@pytest.fixture
def backend():
    """Set the ops backend for one test and restore it afterwards."""
    previous = ops.get_backend()
    yield ops.set_backend
    ops.set_backend(previous)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count calls of the kernel entry point used by the dispatch."""
    calls = []
    original = jdlora_kernels.jd_lora_delta

    def spy(*args, **kwargs):
        calls.append(kwargs.get("metadata"))
        return original(*args, **kwargs)

    monkeypatch.setattr(jdlora_kernels, "jd_lora_delta", spy)
    return calls


def small_problem(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 24, generator=gen)
    U = torch.randn(2, 20, 5, generator=gen, requires_grad=requires_grad)
    V = torch.randn(2, 5, 24, generator=gen)
    sigma = torch.randn(3, 5, 5, generator=gen)
    return x, torch.tensor([0, -1, 2, 1, 1, 0]), U, V, sigma, torch.tensor([1, 0, 1])


# ---------------------------------------------------------------------------------------------- dispatch


@needs_interpreter
def test_backend_switch_routes_cpu_tensors(backend, kernel_calls):
    args = small_problem()
    expected = ops.jd_lora_delta(*args, backend="torch")
    backend("auto")  # CPU tensors: the reference
    torch.testing.assert_close(ops.jd_lora_delta(*args), expected)
    assert not kernel_calls
    assert ops.kernel_metadata(args[1], args[5], torch.device("cpu")) is None
    backend("triton")  # forced: the kernels, in the interpreter
    torch.testing.assert_close(ops.jd_lora_delta(*args), expected, atol=1e-4, rtol=1e-4)
    assert len(kernel_calls) == 1
    meta = ops.kernel_metadata(args[1], args[5], torch.device("cpu"))
    assert isinstance(meta, jdlora_kernels.JDLoraKernelMeta)
    torch.testing.assert_close(ops.jd_lora_delta(*args, metadata=meta), expected, atol=1e-4, rtol=1e-4)
    assert kernel_calls[-1] is meta
    backend("torch")
    torch.testing.assert_close(ops.jd_lora_delta(*args), expected)
    assert len(kernel_calls) == 2
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("cuda")


@needs_interpreter
def test_forced_triton_backend_refuses_gradients(backend):
    args = small_problem(requires_grad=True)
    backend("triton")
    with pytest.raises(RuntimeError, match="no backward"):
        ops.jd_lora_delta(*args)
    with torch.no_grad():
        ops.jd_lora_delta(*args)  # inference is fine
    backend("auto")  # auto never picks the kernels for training
    ops.jd_lora_delta(*args).sum().backward()
    assert args[2].grad is not None


@needs_interpreter
def test_invalid_slots_never_reach_a_kernel(backend, kernel_calls):
    x, _, U, V, sigma, clusters = small_problem()
    backend("triton")
    with pytest.raises(IndexError, match="outside"):
        ops.kernel_metadata(torch.tensor([0, 3, -1, 0, 0, 0]), clusters, torch.device("cpu"))
    with pytest.raises(IndexError, match="outside"):
        ops.jd_lora_delta(x, torch.tensor([0, 0, 0, 0, 0, -4]), U, V, sigma, clusters)
    assert len(kernel_calls) == 1  # the dispatch reached the entry point, which raised while building metadata


# ---------------------------------------------------------------------------------------------- a whole model


@needs_interpreter
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_tiny_llama_through_the_kernels_matches_torch_backend(tmp_path, backend, kernel_calls, sigma_type, monkeypatch):
    # Two clusters, and v_proj with its own cluster assignment: two cluster tables, so two metadata per batch.
    bundle = random_bundle(
        tiny_llama(),
        num_adapters=4,
        r=5,
        sigma_type=sigma_type,
        num_clusters=2,
        cluster_pattern={"v_proj": [1, 0, 0, 1]},
    )
    save_bundle(bundle, tmp_path / "bundle")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "bundle").eval()
    builds = []
    build = ops.kernel_metadata
    monkeypatch.setattr(ops, "kernel_metadata", lambda *a: builds.append(a) or build(*a))
    input_ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(0))
    adapter_ids = ["task_01", None, 3]
    with torch.no_grad():
        backend("torch")
        expected = model(input_ids=input_ids, adapter_ids=adapter_ids).logits
        if sigma_type == "full":
            expected_tokens = model.generate(
                input_ids=input_ids, adapter_ids=adapter_ids, max_new_tokens=2, pad_token_id=0
            )
        assert not kernel_calls
        # The torch path builds no kernel metadata: the backend is decided once per batch shape.
        builds.clear()
        model(input_ids=input_ids, adapter_ids=adapter_ids)
        assert not builds
        builds.clear()
        backend("triton")
        logits = model(input_ids=input_ids, adapter_ids=adapter_ids).logits
        assert len(kernel_calls) == 4  # q_proj and v_proj of 2 layers
        assert len(builds) == 2  # once per cluster table and batch, shared by the layers
        assert all(meta is not None for meta in kernel_calls)
        if sigma_type == "full":  # decode shapes too (the interpreter is slow: one generate is enough)
            tokens = model.generate(input_ids=input_ids, adapter_ids=adapter_ids, max_new_tokens=2, pad_token_id=0)
            assert torch.equal(tokens, expected_tokens)
        base_logits = tiny_llama()(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], base_logits[1], atol=0, rtol=0)  # the base row
    assert (logits[0] - base_logits[0]).abs().max() > 1e-2  # the adapters change the output: not vacuous


@pytest.mark.skipif(
    jdlora_kernels.INTERPRETED or not torch.cuda.is_available(), reason="needs a GPU with the compiled kernels"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_on_cuda_through_the_kernels_matches_torch_backend(tmp_path, backend, kernel_calls, dtype):
    # The serving path on a GPU: "auto" picks the kernels for CUDA tensors; the torch backend is the reference.
    clusters = {"v_proj": [1, 0, 1, 0, 1, 1]}
    bundle = random_bundle(tiny_llama(), num_adapters=6, r=8, num_clusters=2, cluster_pattern=clusters)
    save_bundle(bundle, tmp_path / "bundle")
    model = PeftModel.from_pretrained(tiny_llama(dtype=dtype).cuda(), tmp_path / "bundle").eval()
    input_ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(1)).cuda()
    adapter_ids = ["task_01", None, 5, "task_03"]
    with torch.no_grad():
        backend("torch")
        expected = model(input_ids=input_ids, adapter_ids=adapter_ids).logits
        assert not kernel_calls
        backend("auto")
        logits = model(input_ids=input_ids, adapter_ids=adapter_ids).logits
        assert len(kernel_calls) == 4 and all(meta is not None for meta in kernel_calls)
        tokens = model.generate(input_ids=input_ids, adapter_ids=adapter_ids, max_new_tokens=3, pad_token_id=0)
        backend("torch")
        expected_tokens = model.generate(input_ids=input_ids, adapter_ids=adapter_ids, max_new_tokens=3, pad_token_id=0)
        base_logits = tiny_llama(dtype=dtype).cuda()(input_ids=input_ids).logits
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(logits[1], base_logits[1], atol=0, rtol=0)  # the base row
    assert (logits[0] - base_logits[0]).abs().max() > 1e-2
    if dtype == torch.float32:
        assert torch.equal(tokens, expected_tokens)


# ---------------------------------------------------------------------------------------------- packaging


def test_kernel_module_stands_alone():
    # A Hub kernel ships alone: torch, triton, the standard library and its own modules only.
    allowed = {"torch", "triton", "__future__", *sys.stdlib_module_names}
    for path in KERNEL_SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"
    assert Path(jdlora_kernels.__file__).resolve().parent == KERNEL_SOURCE.resolve()  # the installed module


@needs_kernels_library
def test_build_toml_is_a_valid_noarch_kernel_config():
    from kernels._rust import Backend, Build

    build = Build.open(KERNEL_DIR)
    assert set(build.general.backends) == {Backend.CUDA, Backend.ROCm, Backend.XPU}
    text = (KERNEL_DIR / "build.toml").read_text()
    assert "[torch-noarch]" in text and 'name = "jdlora-kernels"' in text


def _build_noarch():
    spec = importlib.util.spec_from_file_location("jdlora_build_noarch", KERNEL_DIR / "build_noarch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_interpreter
@needs_kernels_library
def test_noarch_build_loads_with_kernels_get_local_kernel(tmp_path):
    from kernels._rust import Digest, DigestAlgorithm, Metadata

    import kernels

    variants = _build_noarch().main(["--backends", "cpu,cuda", "--out", str(tmp_path), "--rev", "test123"])
    assert [v.name for v in variants] == ["torch-cpu", "torch-cuda"]
    for variant in variants:
        metadata = Metadata.read_from_file(variant / "metadata.json")
        assert str(metadata.name) == "jdlora-kernels" and metadata.version == 1
        metadata.digest.validate(Digest.hash_variant(DigestAlgorithm.SHA256, variant))  # digest is right
        assert (variant / "__init__.py").is_file() and not list(variant.rglob("__pycache__"))
    assert json.loads((tmp_path / "torch-cuda" / "metadata.json").read_text())["backend"] == {"type": "cuda"}

    module = kernels.get_local_kernel(tmp_path)  # picks torch-cpu on this machine
    assert module.__name__ == "_jdlora_kernels_cpu_test123" and module is not jdlora_kernels
    x, slots, U, V, sigma, clusters = small_problem()
    meta = module.JDLoraKernelMeta.from_token_slots(slots, clusters)
    y = module.add_jd_lora(torch.zeros(6, 20), x, meta, U, V, sigma)
    expected = jdlora_kernels.jd_lora_delta_ref(x, slots, U, V, sigma, clusters)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_tgi_convention_module_first_then_kernel_repository(tmp_path, monkeypatch, backend):
    # TGI's load_kernel(module=..., repo_id=...): an importable module first...
    assert importlib.import_module(ops.KERNELS_MODULE) is jdlora_kernels
    ops._load_kernels.cache_clear()
    try:
        assert ops.kernels_module() is jdlora_kernels
        # ...and the kernel from a repository (here a local build) when the module is not importable.
        _build_noarch().main(["--backends", "cpu", "--out", str(tmp_path), "--rev", "hub"])
        monkeypatch.setitem(sys.modules, ops.KERNELS_MODULE, None)  # makes `import jdlora_kernels` fail
        monkeypatch.delenv("PEFT_JDLORA_KERNELS", raising=False)
        ops._load_kernels.cache_clear()
        assert ops.kernels_module() is None and not ops.triton_available(torch.device("cpu"))
        backend("triton")
        with pytest.raises(RuntimeError, match="not importable"):
            ops.jd_lora_delta(*small_problem())
        monkeypatch.setenv("PEFT_JDLORA_KERNELS", str(tmp_path))
        ops._load_kernels.cache_clear()
        module = ops.kernels_module()
        assert module.__name__ == "_jdlora_kernels_cpu_hub"
        args = small_problem()
        torch.testing.assert_close(
            ops.jd_lora_delta(*args), ops.jd_lora_delta(*args, backend="torch"), atol=1e-4, rtol=1e-4
        )
    finally:
        monkeypatch.undo()
        ops._load_kernels.cache_clear()
