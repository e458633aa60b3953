"""The Triton kernels (jdlora_kernels) against their PyTorch references and a float64 reference, and the batch
metadata they run on (vLLM and TGI descriptions, host-side checks).

On a machine without a GPU the kernels run on CPU tensors in the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before anything imports triton); with TRITON_INTERPRET=0 and a GPU they run on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jdlora_kernels as jk
import pytest
import torch
from jdlora_kernels import _utils

from peft_jdlora import ops

if jk.INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:  # launching Triton without the interpreter and without a GPU raises "0 active drivers"
    pytest.skip("no GPU and TRITON_INTERPRET is not set: the kernels cannot run", allow_module_level=True)

Meta = jk.JDLoraKernelMeta


@dataclass
class Problem:
    x: torch.Tensor  # [T, d_in]
    slots: torch.Tensor  # [T] int64, -1 = base
    clusters: torch.Tensor  # [N] int64
    U: torch.Tensor  # [C, d_out, r]
    V: torch.Tensor  # [C, r, d_in]
    sigma: torch.Tensor  # [N, r, r] or [N, r]

    def to(self, dtype: torch.dtype) -> Problem:
        cast = lambda t: t.to(dtype)  # noqa: E731
        return Problem(cast(self.x), self.slots, self.clusters, cast(self.U), cast(self.V), cast(self.sigma))

    def meta(self, block_m: Optional[int] = None) -> jk.JDLoraKernelMeta:
        return Meta.from_token_slots(self.slots, self.clusters, device=self.x.device, block_m=block_m)

    def fp64(self) -> torch.Tensor:
        """The update computed in float64 from the (already rounded) inputs: the high-precision reference."""
        d = lambda t: t.double()  # noqa: E731
        return jk.jd_lora_delta_ref(d(self.x), self.slots, d(self.U), d(self.V), d(self.sigma), self.clusters)

    def torch_backend(self) -> torch.Tensor:
        """peft-jdlora's PyTorch path in the inputs' dtype (it takes slots and clusters on the inputs' device)."""
        slots, clusters = self.slots.to(self.x.device), self.clusters.to(self.x.device)
        return ops.jd_lora_delta(self.x, slots, self.U, self.V, self.sigma, clusters, backend="torch")


def make_slots(pattern: str, T: int, N: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "random":  # ragged groups, base rows mixed in
        return torch.randint(-1, N, (T,), generator=gen)
    if pattern == "one":  # a single adapter for every token
        return torch.full((T,), N // 2, dtype=torch.int64)
    if pattern == "distinct":  # decode: every token its own adapter
        return torch.randperm(N, generator=gen)[:T]
    if pattern == "segments":  # prefill: long contiguous requests (several tiles per adapter) and a base request
        lengths, ids = torch.tensor([17, 1, 20, 5, 10]), torch.tensor([3, 0, -1, 3, 1])
        return ids.repeat_interleave(lengths)[:T]
    raise ValueError(pattern)


def make_problem(
    T: int, d_in: int, d_out: int, r: int, N: int, C: int, slots: str, sigma_type: str, seed: int = 0
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    U = torch.randn(C, d_out, r, generator=gen) / r**0.5
    V = torch.randn(C, r, d_in, generator=gen) / d_in**0.5
    sigma = torch.randn((N, r, r) if sigma_type == "full" else (N, r), generator=gen)
    clusters = (torch.arange(N) % C)[torch.randperm(N, generator=gen)]  # slots are not cluster-contiguous
    problem = Problem(x, make_slots(slots, T, N, gen), clusters, U, V, sigma)
    return Problem(*(t.to(DEVICE) if t.is_floating_point() else t for t in vars(problem).values()))


# r not a power of two, d_in / d_out not multiples of the tiles, several clusters.
CASES = {
    "ragged": dict(T=37, d_in=72, d_out=40, r=20, N=6, C=2, slots="random"),
    "one_adapter": dict(T=21, d_in=48, d_out=33, r=16, N=4, C=1, slots="one"),
    "all_distinct": dict(T=24, d_in=40, d_out=56, r=12, N=30, C=3, slots="distinct"),
    "prefill_segments": dict(T=53, d_in=64, d_out=64, r=24, N=5, C=2, slots="segments"),
    "tiny_rank": dict(T=9, d_in=20, d_out=18, r=3, N=3, C=2, slots="random"),
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))


def run_kernel(p: Problem, meta: jk.JDLoraKernelMeta, mode: Optional[int] = None, split_k: int = 1) -> torch.Tensor:
    y = torch.zeros(p.x.shape[0], p.U.shape[1], dtype=p.x.dtype, device=p.x.device)
    return jk.add_jd_lora(y, p.x, meta, p.U, p.V, p.sigma, sigma_mode=mode, shrink_config={"SPLIT_K": split_k})


# ---------------------------------------------------------------------------------------------- kernels (fp32)


@pytest.mark.parametrize("sigma_type", ["full", "diag"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_match_fp64_and_pytorch_references(case, sigma_type):
    p = make_problem(**CASES[case], sigma_type=sigma_type, seed=len(case))
    expected = p.fp64()
    torch_backend = p.torch_backend()
    # block_m 32 makes the prefill case take several tiles per adapter with either tile size.
    meta = p.meta(block_m=32 if case == "prefill_segments" else None)
    lora_rows = p.slots >= 0
    assert rel_err(torch_backend, expected) < 1e-5
    modes = [jk.SIGMA_DIAG] if sigma_type == "diag" else [jk.SIGMA_TILE, jk.SIGMA_ROW]
    for mode in modes:
        for split_k in (1, 3):  # 3: uneven split of the K loop, combined with atomics
            y = run_kernel(p, meta, mode, split_k)
            assert rel_err(y, expected) < 1e-5, (mode, split_k)
            assert rel_err(y, torch_backend) < 1e-5, (mode, split_k)
            assert torch.equal(y[~lora_rows], torch.zeros_like(y[~lora_rows]))  # base rows untouched
            assert bool((y[lora_rows].abs().amax(dim=1) > 0).all())  # every LoRA row got its update
    ref = jk.add_jd_lora_ref(torch.zeros_like(y), p.x, meta, p.U, p.V, p.sigma)
    assert rel_err(ref, expected) < 1e-5


@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_shrink_and_expand_match_their_references(sigma_type):
    p = make_problem(**CASES["ragged"], sigma_type=sigma_type, seed=3)
    meta = p.meta()
    L = meta.num_lora_tokens
    z = jk.jd_lora_shrink(p.x, meta, p.V, p.sigma)
    z_ref = jk.jd_lora_shrink_ref(p.x, meta, p.V, p.sigma)
    assert z.shape == (1, p.x.shape[0], p.V.shape[1]) and z.dtype == torch.float32
    assert rel_err(z[:, :L], z_ref[:, :L]) < 1e-5
    out = jk.jd_lora_expand(z_ref, meta, p.U)
    out_ref = jk.jd_lora_expand_ref(z_ref, meta, p.U)
    assert rel_err(out, out_ref) < 1e-5


def test_sigma_mode_follows_tokens_per_adapter():
    decode = Meta.from_token_slots(torch.arange(32), torch.zeros(64, dtype=torch.int64))  # 32 adapters, 1 token each
    prefill = Meta.from_token_slots(torch.arange(2).repeat_interleave(64), torch.zeros(2, dtype=torch.int64))
    assert jk.shrink.choose_sigma_mode(decode, diagonal=False) == jk.SIGMA_ROW
    assert jk.shrink.choose_sigma_mode(prefill, diagonal=False) == jk.SIGMA_TILE
    assert jk.shrink.choose_sigma_mode(decode, diagonal=True) == jk.SIGMA_DIAG
    assert decode.num_adapter_tiles == 32 and decode.num_cluster_tiles == 2


@pytest.mark.parametrize("sigma_type", ["full", "diag"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, sigma_type):
    p = make_problem(**CASES["ragged"], sigma_type=sigma_type, seed=5).to(dtype)
    expected = p.fp64()
    y = jk.jd_lora_delta(p.x, p.slots, p.U, p.V, p.sigma, p.clusters)
    assert y.dtype == dtype
    torch_err = rel_err(p.torch_backend(), expected)
    # fp32 accumulation and an fp32 intermediate: about as accurate as the PyTorch path in the same dtype. The
    # interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest), which doubles the rounding error there.
    slack = 3.0 if jk.INTERPRETED and dtype == torch.bfloat16 else 1.5
    assert rel_err(y, expected) <= slack * torch_err + 1e-3
    assert rel_err(y, expected) < (5e-3 if dtype == torch.float16 else 3e-2)


def test_fused_slices_share_the_input():
    # Fused QKV: three modules of different widths, one input, one metadata, two launches.
    base = make_problem(**CASES["ragged"], sigma_type="full", seed=7)
    gen = torch.Generator().manual_seed(8)
    C, _, r = base.U.shape
    widths = (40, 16, 24)
    Us = [(torch.randn(C, w, r, generator=gen) / r**0.5).to(DEVICE) for w in widths]
    Vs = [base.V, *(torch.randn_like(base.V.cpu(), device="cpu").to(DEVICE) / 8 for _ in range(2))]
    sigmas = [base.sigma, *(torch.randn_like(base.sigma.cpu()).to(DEVICE) for _ in range(2))]
    meta = base.meta()
    fused = jk.add_jd_lora(torch.zeros(base.x.shape[0], sum(widths), device=DEVICE), base.x, meta, Us, Vs, sigmas)
    start = 0
    for U, V, sigma, width in zip(Us, Vs, sigmas, widths):
        single = jk.jd_lora_delta_ref(base.x, base.slots, U, V, sigma, base.clusters)
        assert rel_err(fused[:, start : start + width], single) < 1e-5
        start += width
    # Explicit column offsets into a wider output: columns outside the slices keep their values.
    out = torch.full((base.x.shape[0], 100), 7.0, device=DEVICE)
    jk.add_jd_lora(out, base.x, meta, Us, Vs, sigmas, output_offsets=[50, 0, 20])
    assert torch.equal(out[:, 16:20], torch.full_like(out[:, 16:20], 7.0))
    assert torch.equal(out[:, 90:], torch.full_like(out[:, 90:], 7.0))
    assert rel_err(out[:, 50:90] - 7.0, fused[:, :40]) < 1e-5
    assert rel_err(out[:, 0:16] - 7.0, fused[:, 40:56]) < 1e-5


def test_adds_into_existing_output_and_keeps_base_rows_exact():
    p = make_problem(**CASES["ragged"], sigma_type="full", seed=9)
    y0 = torch.randn(p.x.shape[0], p.U.shape[1], device=DEVICE)
    y = jk.add_jd_lora(y0.clone(), p.x, p.meta(), p.U, p.V, p.sigma)
    base = p.slots < 0
    assert torch.equal(y[base], y0[base])
    assert rel_err(y[~base] - y0[~base], p.fp64()[~base]) < 1e-5


def test_strided_inputs():
    p = make_problem(**CASES["ragged"], sigma_type="full", seed=11)
    wide_x = torch.randn(p.x.shape[0], p.x.shape[1] + 9, device=DEVICE)
    wide_x[:, 5 : 5 + p.x.shape[1]] = p.x
    x_view = wide_x[:, 5 : 5 + p.x.shape[1]]  # row stride != d_in
    U_t = p.U.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major per cluster
    y = jk.jd_lora_delta(x_view, p.slots, U_t, p.V, p.sigma, p.clusters)
    assert not x_view.is_contiguous() and not U_t.is_contiguous()
    assert rel_err(y, p.fp64()) < 1e-5


def test_empty_batch_and_all_base_rows():
    p = make_problem(**CASES["tiny_rank"], sigma_type="full")
    empty = jk.jd_lora_delta(p.x[:0], p.slots[:0], p.U, p.V, p.sigma, p.clusters)
    assert empty.shape == (0, p.U.shape[1])
    all_base = torch.full_like(p.slots, -1)
    y = jk.jd_lora_delta(p.x, all_base, p.U, p.V, p.sigma, p.clusters)
    assert torch.equal(y, torch.zeros_like(y))


def test_copy_refreshes_metadata_in_place():
    # A CUDA-graph replay keeps the captured metadata buffers: copy_ must carry the next batch into them.
    p = make_problem(**CASES["ragged"], sigma_type="full", seed=13)
    other_slots = torch.randint(-1, p.sigma.shape[0], p.slots.shape, generator=torch.Generator().manual_seed(1))
    captured = p.meta()
    fresh = Meta.from_token_slots(other_slots, p.clusters, device=DEVICE)
    assert captured.layout_key == fresh.layout_key and captured.buffer.numel() == fresh.buffer.numel()
    buffer = captured.buffer
    captured.copy_(fresh)
    assert captured.buffer is buffer  # same storage, new contents
    y = run_kernel(p, captured)
    expected = jk.jd_lora_delta_ref(p.x, other_slots, p.U, p.V, p.sigma, p.clusters)
    assert rel_err(y, expected) < 1e-5
    with pytest.raises(ValueError, match="layout"):
        captured.copy_(Meta.from_token_slots(other_slots[:5], p.clusters, device=DEVICE))


def test_launch_wrappers_check_shapes_on_the_host():
    p = make_problem(**CASES["ragged"], sigma_type="full")
    meta = p.meta()
    with pytest.raises(ValueError, match="x must be"):
        jk.jd_lora_shrink(p.x[:-1], meta, p.V, p.sigma)
    with pytest.raises(ValueError, match="sigma must be"):
        jk.jd_lora_shrink(p.x, meta, p.V, p.sigma[:-1])
    with pytest.raises(ValueError, match="clusters"):
        jk.jd_lora_shrink(p.x, meta, p.V[:1], p.sigma)
    with pytest.raises(ValueError, match="does not fit"):
        jk.jd_lora_shrink(p.x, meta, p.V, p.sigma, sigma_mode=jk.SIGMA_DIAG)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        jk.jd_lora_shrink(p.x.double(), meta, p.V.double(), p.sigma)
    z = jk.jd_lora_shrink(p.x, meta, p.V, p.sigma)
    with pytest.raises(ValueError, match="does not fit"):
        jk.jd_lora_expand(z, meta, p.U, out=torch.zeros(p.x.shape[0], 10, device=DEVICE))
    with pytest.raises(KeyError, match="unknown launch parameters"):
        jk.jd_lora_shrink(p.x, meta, p.V, p.sigma, config={"BLOCK_Q": 1})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _utils.check_launchable(torch.device("cpu"), interpreted=False)


@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_dense_one_basis_path_matches_fp64_and_the_kernels(sigma_type):
    p = make_problem(**{**CASES["ragged"], "C": 1}, sigma_type=sigma_type, seed=19)
    meta = p.meta()
    expected = p.fp64()
    y0 = torch.randn(p.x.shape[0], p.U.shape[1], device=DEVICE)
    y = jk.add_jd_lora_dense(y0.clone(), p.x, meta, p.U, p.V, p.sigma)
    base = p.slots < 0
    assert torch.equal(y[base], y0[base])  # base rows get an exact zero added
    assert rel_err(y - y0, expected) < 1e-5
    assert rel_err(y - y0, run_kernel(p, meta)) < 1e-5
    # The shrink handed in, as the base GEMM x·[W; V_0]ᵀ gives it: the same update.
    W = torch.randn(p.U.shape[1], p.x.shape[1], device=DEVICE)
    folded = p.x @ torch.cat([W, p.V[0]]).T  # [T, d_out + r]
    d_out = W.shape[0]
    out = folded[:, :d_out]  # a strided view: the layer's output is updated in place
    jk.add_jd_lora_dense(out, p.x, meta, p.U, p.V, p.sigma, shrunk=folded[:, d_out:])
    assert rel_err(out - p.x @ W.T, expected) < 1e-5
    with pytest.raises(ValueError, match="one basis"):
        two = make_problem(**CASES["ragged"], sigma_type=sigma_type)
        jk.add_jd_lora_dense(torch.zeros_like(y), two.x, two.meta(), two.U, two.V, two.sigma)
    with pytest.raises(ValueError, match="shrunk must be"):
        jk.add_jd_lora_dense(y, p.x, meta, p.U, p.V, p.sigma, shrunk=folded[:, :3])


# ---------------------------------------------------------------------------------------------- metadata


def test_metadata_fields_follow_vllm_and_group_by_cluster():
    # slots 0 and 2 are in cluster 1, slot 1 in cluster 0: sorted by (cluster, slot), base tokens last.
    slots = torch.tensor([2, -1, 0, 2, 1, -1, 0, 2])
    meta = Meta.from_token_slots(slots, torch.tensor([1, 0, 1]), block_m=16)
    as_list = lambda t: t.tolist()  # noqa: E731
    assert as_list(meta.token_lora_mapping) == slots.tolist()
    assert as_list(meta.token_indices_sorted_by_lora_ids) == [4, 2, 6, 0, 3, 7, 1, 5]  # stable within a slot
    assert as_list(meta.sorted_slots) == [1, 0, 0, 2, 2, 2, -1, -1]
    assert as_list(meta.active_lora_ids) == [1, 0, 2]
    assert as_list(meta.num_tokens_per_lora) == [1, 2, 3]
    assert as_list(meta.lora_token_start_loc) == [0, 1, 3, 6]
    assert as_list(meta.active_cluster_ids) == [0, 1]
    assert as_list(meta.num_tokens_per_cluster) == [1, 5]
    assert as_list(meta.cluster_token_start_loc) == [0, 1, 6]
    assert as_list(meta.slot_to_cluster) == [1, 0, 1]
    assert as_list(meta.adapter_tiles) == [[0, 1, 1, 0], [1, 2, 0, 1], [3, 3, 2, 1], [0, 0, 0, 0]]
    assert as_list(meta.cluster_tiles) == [[0, 1, -1, 0], [1, 5, -1, 1], [0, 0, 0, 0]]
    assert (meta.num_lora_tokens, meta.num_active_loras, meta.num_active_clusters) == (6, 3, 2)
    assert meta.buffer.dtype == torch.int32 and meta.token_lora_mapping.data_ptr() % 16 == 0


@pytest.mark.parametrize("block_m", [16, 32])
def test_metadata_tiles_partition_every_group(block_m):
    gen = torch.Generator().manual_seed(block_m)
    slots = torch.randint(-1, 9, (150,), generator=gen)
    clusters = torch.randint(0, 4, (9,), generator=gen)
    meta = Meta.from_token_slots(slots, clusters, block_m=block_m)
    L = meta.num_lora_tokens
    sorted_slots = meta.sorted_slots.long()
    sorted_clusters = clusters[sorted_slots[:L]]
    assert bool((sorted_slots[:L] >= 0).all()) and bool((sorted_slots[L:] == -1).all())
    assert bool((torch.diff(sorted_clusters * 9 + sorted_slots[:L]) >= 0).all())  # (cluster, slot) order
    for tiles, count, by_slot in (
        (meta.adapter_tiles, meta.num_adapter_tiles, True),
        (meta.cluster_tiles, meta.num_cluster_tiles, False),
    ):
        covered = torch.zeros(L, dtype=torch.int64)
        for start, length, slot, cluster in tiles[:count].tolist():
            assert 0 < length <= block_m
            rows = slice(start, start + length)
            covered[rows] += 1
            assert bool((sorted_clusters[rows] == cluster).all())
            if by_slot:
                assert bool((sorted_slots[rows] == slot).all())
        assert bool((covered == 1).all())  # every LoRA row in exactly one tile
        assert bool((tiles[count:, 1] == 0).all())  # the rest is zero-length padding
    # The layout (and so every grid) depends on the shapes only, not on which slots the tokens use.
    other = Meta.from_token_slots(torch.zeros(150, dtype=torch.int64), clusters, block_m=block_m)
    assert other.layout_key == meta.layout_key and other.buffer.numel() == meta.buffer.numel()
    assert (other.max_adapter_tiles, other.max_cluster_tiles) == (meta.max_adapter_tiles, meta.max_cluster_tiles)


@dataclass
class TGIAdapterBatchMetadata:
    """The fields of TGI's AdapterBatchMetadata (adapter index 0 = base model)."""

    adapter_indices: torch.Tensor  # [T]
    adapter_set: set
    adapter_segments: torch.Tensor  # [S + 1]
    segment_indices: list  # [S]


def test_metadata_from_tgi_and_vllm_descriptions():
    clusters = torch.tensor([0, 1, 1])
    slots = torch.tensor([0, 0, -1, 2, 2, 2, 1])
    expected = Meta.from_token_slots(slots, clusters)
    tgi = TGIAdapterBatchMetadata(
        adapter_indices=slots + 1,
        adapter_set={0, 1, 2, 3},
        adapter_segments=torch.tensor([0, 2, 3, 6, 7]),
        segment_indices=[1, 0, 3, 2],
    )
    for meta in (
        Meta.from_tgi(tgi, clusters),
        Meta.from_tgi(TGIAdapterBatchMetadata(slots + 1, set(), None, None), clusters),  # per-token indices only
        Meta.from_vllm(slots.to(torch.int32), clusters),
    ):
        assert torch.equal(meta.buffer, expected.buffer) and meta.layout_key == expected.layout_key
    tgi.adapter_indices = torch.tensor([1, 1, 0, 3, 3, 2, 2])
    with pytest.raises(ValueError, match="disagrees"):
        Meta.from_tgi(tgi, clusters)
    bad_bounds = TGIAdapterBatchMetadata(slots + 1, set(), torch.tensor([0, 2, 3]), [1, 0, 3, 2])
    with pytest.raises(ValueError, match="boundaries"):
        Meta.from_tgi(bad_bounds, clusters)


def test_invalid_slots_are_rejected_on_the_host():
    clusters = torch.tensor([0, 0, 1])
    with pytest.raises(IndexError, match=r"\[3\].*outside \[-1, 3\)"):
        Meta.from_token_slots(torch.tensor([0, 3, 1]), clusters)
    with pytest.raises(IndexError, match=r"\[-2\]"):
        Meta.from_token_slots(torch.tensor([-2, 0]), clusters)
    with pytest.raises(TypeError, match="integer"):
        Meta.from_token_slots(torch.tensor([0.0, 1.0]), clusters)
    with pytest.raises(ValueError, match="negative cluster"):
        Meta.from_token_slots(torch.tensor([0]), torch.tensor([0, -1]))
    with pytest.raises(IndexError, match="outside"):  # TGI index 4 = slot 3 of a 3-adapter bundle
        Meta.from_tgi(TGIAdapterBatchMetadata(torch.tensor([4, 0]), set(), None, None), clusters)
    with pytest.raises(IndexError, match=">= 0"):
        Meta.from_tgi(TGIAdapterBatchMetadata(torch.tensor([-1, 0]), set(), None, None), clusters)
    # The op itself: an invalid slot raises before any kernel is launched.
    p = make_problem(**CASES["tiny_rank"], sigma_type="diag")
    bad = p.slots.clone()
    bad[0] = p.sigma.shape[0]
    with pytest.raises(IndexError, match="outside"):
        jk.jd_lora_delta(p.x, bad, p.U, p.V, p.sigma, p.clusters)


# ---------------------------------------------------------------------------------------------- GPU only

gpu_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (CUDA graphs, compiled kernels)")


@gpu_only
def test_cuda_graph_capture_and_replay_with_new_batch():
    p = make_problem(**CASES["ragged"], sigma_type="full", seed=17)
    meta = p.meta()
    y = torch.zeros(p.x.shape[0], p.U.shape[1], device=DEVICE)
    jk.add_jd_lora(y, p.x, meta, p.U, p.V, p.sigma)  # warm up: compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        jk.add_jd_lora(y, p.x, meta, p.U, p.V, p.sigma)
    new_slots = torch.randint(-1, p.sigma.shape[0], p.slots.shape, generator=torch.Generator().manual_seed(3))
    meta.copy_(Meta.from_token_slots(new_slots, p.clusters, device=DEVICE))
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    expected = jk.jd_lora_delta_ref(p.x, new_slots.to(DEVICE), p.U, p.V, p.sigma, p.clusters.to(DEVICE))
    assert rel_err(y, expected) < 1e-4


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_and_prefill_shapes(dtype):
    for T, N in ((256, 1000), (2048, 4)):
        gen = torch.Generator().manual_seed(T)
        p = Problem(
            x=torch.randn(T, 1024, generator=gen).to(DEVICE, dtype),
            slots=torch.randint(-1, N, (T,), generator=gen),
            clusters=torch.randint(0, 2, (N,), generator=gen),
            U=(torch.randn(2, 768, 40, generator=gen) / 6).to(DEVICE, dtype),
            V=(torch.randn(2, 40, 1024, generator=gen) / 32).to(DEVICE, dtype),
            sigma=torch.randn(N, 40, 40, generator=gen).to(DEVICE, dtype),
        )
        y = jk.jd_lora_delta(p.x, p.slots, p.U, p.V, p.sigma, p.clusters)
        assert rel_err(y, p.fp64().to(DEVICE)) < (5e-3 if dtype == torch.float16 else 3e-2)


def gpu_problem(T: int, d: int, r: int, N: int, C: int, pattern: str, sigma_type: str, dtype, seed: int) -> Problem:
    """Serving-sized problem on the GPU: decode (every token its own adapter, some base rows) or prefill (requests of
    contiguous tokens, one adapter each)."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "decode":
        slots = torch.randperm(N, generator=gen)[:T]
        slots[torch.randperm(T, generator=gen)[: T // 8]] = -1
    else:
        requests = torch.randint(-1, N, (64,), generator=gen)
        slots = requests.repeat_interleave(T // 64)
    return Problem(
        x=torch.randn(T, d, generator=gen).to(DEVICE, dtype),
        slots=slots,
        clusters=torch.randint(0, C, (N,), generator=gen),
        U=(torch.randn(C, d, r, generator=gen) / r**0.5).to(DEVICE, dtype),
        V=(torch.randn(C, r, d, generator=gen) / d**0.5).to(DEVICE, dtype),
        sigma=torch.randn((N, r, r) if sigma_type == "full" else (N, r), generator=gen).to(DEVICE, dtype),
    )


@gpu_only
@pytest.mark.parametrize("clusters", [1, 2, 8])
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_serving_shapes_every_epilogue_and_split(dtype, sigma_type, clusters):
    # d 4096, r 16, a bundle of 1000: decode 256 tokens (256 distinct adapters) and prefill 2048 tokens (64 requests);
    # every Σ epilogue, the heuristic split-K and none, against float64 and against PyTorch in the same dtype.
    limit = 5e-3 if dtype == torch.float16 else 3e-2
    modes = [jk.SIGMA_DIAG] if sigma_type == "diag" else [jk.SIGMA_TILE, jk.SIGMA_ROW]
    for T, pattern in ((256, "decode"), (2048, "prefill")):
        p = gpu_problem(T, 4096, 16, 1000, clusters, pattern, sigma_type, dtype, seed=T + clusters)
        expected = p.fp64().to(DEVICE)
        torch_err = rel_err(p.torch_backend(), expected)
        meta = p.meta()
        base = (p.slots < 0).to(DEVICE)
        for mode in modes:
            for config in (None, {"SPLIT_K": 1}):
                y = torch.zeros(T, 4096, dtype=dtype, device=DEVICE)
                jk.add_jd_lora(y, p.x, meta, p.U, p.V, p.sigma, sigma_mode=mode, shrink_config=config)
                err = rel_err(y, expected)
                assert err < limit and err <= 1.5 * torch_err + 1e-3, (T, mode, config, err, torch_err)
                assert not bool(y[base].any())  # base rows untouched
        if clusters == 1:
            y = jk.add_jd_lora_dense(torch.zeros(T, 4096, dtype=dtype, device=DEVICE), p.x, meta, p.U, p.V, p.sigma)
            assert rel_err(y, expected) < limit


@gpu_only
def test_gpu_fused_slices_and_dense_path_replay_in_a_cuda_graph():
    # Fused QKV (4096 / 1024 / 1024 columns) and the one-basis dense path, captured once and replayed on a new batch.
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(21)
    T, d, r, N = 64, 4096, 16, 1000
    x = torch.randn(T, d, generator=gen).to(DEVICE, dtype)
    clusters = torch.zeros(N, dtype=torch.int64)
    widths = (4096, 1024, 1024)
    Us = [(torch.randn(1, w, r, generator=gen) / 4).to(DEVICE, dtype) for w in widths]
    Vs = [(torch.randn(1, r, d, generator=gen) / 64).to(DEVICE, dtype) for _ in widths]
    sigmas = [torch.randn(N, r, r, generator=gen).to(DEVICE, dtype) for _ in widths]
    slots = torch.randint(-1, N, (T,), generator=gen)
    meta = Meta.from_token_slots(slots, clusters, device=DEVICE)
    fused = torch.zeros(T, sum(widths), dtype=dtype, device=DEVICE)
    dense = torch.zeros(T, widths[0], dtype=dtype, device=DEVICE)

    def step():
        fused.zero_()
        dense.zero_()
        jk.add_jd_lora(fused, x, meta, Us, Vs, sigmas)
        jk.add_jd_lora_dense(dense, x, meta, Us[0], Vs[0], sigmas[0])

    step()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_slots = torch.randint(-1, N, (T,), generator=gen)
    meta.copy_(Meta.from_token_slots(new_slots, clusters, device=DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    new_slots, clusters = new_slots.to(DEVICE), clusters.to(DEVICE)
    start = 0
    for U, V, sigma, width in zip(Us, Vs, sigmas, widths):
        expected = jk.jd_lora_delta_ref(x.double(), new_slots, U.double(), V.double(), sigma.double(), clusters)
        assert rel_err(fused[:, start : start + width], expected) < 3e-2
        start += width
    expected = jk.jd_lora_delta_ref(x.double(), new_slots, Us[0].double(), Vs[0].double(), sigmas[0].double(), clusters)
    assert rel_err(dense, expected) < 3e-2
