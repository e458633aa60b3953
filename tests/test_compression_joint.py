"""The compression algorithms against brute force on small dense problems (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from peft_jdlora.compression import LoraAdapter, compress
from peft_jdlora.compression.joint import init_full, jd_diag, jd_full
from peft_jdlora.compression.svd import canonicalize
from peft_jdlora.compression.synthetic import SyntheticSource

F64 = torch.float64


MODULES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (12, 20), "layers.1.q_proj": (24, 20)}


def random_factors(M=2, N=6, R=4, d_out=20, d_in=16, shared=5, noise=0.3, seed=0):
    """A: [M, N, R, d_in], B: [M, N, d_out, R]: a hidden shared basis plus noise, random scales."""
    g = torch.Generator().manual_seed(seed)
    U0 = torch.linalg.qr(torch.randn(d_out, shared, generator=g, dtype=F64)).Q
    V0 = torch.linalg.qr(torch.randn(d_in, shared, generator=g, dtype=F64)).Q
    B = U0 @ torch.randn(M, N, shared, R, generator=g, dtype=F64) + noise * torch.randn(
        M, N, d_out, R, generator=g, dtype=F64
    )
    A = torch.randn(M, N, R, shared, generator=g, dtype=F64) @ V0.T + noise * torch.randn(
        M, N, R, d_in, generator=g, dtype=F64
    )
    scale = torch.exp(torch.randn(M, N, 1, 1, generator=g, dtype=F64))  # unequal norms: the weights must matter
    return A, B * scale


def normalised_dense(A, B):
    """[M, N, d_out, d_in] ΔW_i / ‖ΔW_i‖."""
    dW = B @ A
    return dW / dW.flatten(2).norm(dim=-1)[..., None, None]


def dense_jd_reference(W, U, V, max_iter=5000, tol=1e-13):
    """Exact alternating maximisation with dense eigen-decompositions: U = top-r eigvecs of Σ W V Vᵀ Wᵀ, …
    W: [N, d_out, d_in] normalised updates; runs until the projectors stop moving."""
    r = U.shape[1]
    for _ in range(max_iter):
        WV = W @ V  # [N, d_out, r]
        U_new = torch.linalg.eigh((WV @ WV.mT).sum(0))[1][:, -r:]
        WtU = W.mT @ U_new  # [N, d_in, r]
        V_new = torch.linalg.eigh((WtU @ WtU.mT).sum(0))[1][:, -r:]
        change = (U_new @ U_new.T - U @ U.T).norm() + (V_new @ V_new.T - V @ V.T).norm()
        U, V = U_new, V_new
        if change < tol:
            break
    error = (1 - (U.T @ W @ V).square().sum((1, 2))).sum()
    return U, V, float(error)


def generators(M, seed=0):
    return [torch.Generator().manual_seed(seed + j) for j in range(M)]


def test_canonical_form_is_the_exact_svd_of_the_product():
    A, B = random_factors()
    batch = canonicalize(A, B)
    M, N, R = batch.s.shape
    P, Q = batch.left_vectors(), batch.right_vectors()  # [M, N, d, R]
    dense = B @ A
    rebuilt = (P * (batch.s * batch.norm[..., None]).unsqueeze(-2)) @ Q.mT
    torch.testing.assert_close(rebuilt, dense, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(batch.norm, dense.flatten(2).norm(dim=-1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(P.mT @ P, torch.eye(R, dtype=F64).expand(M, N, R, R), atol=1e-12, rtol=0)
    singular = torch.linalg.svdvals(dense)[..., :R]
    torch.testing.assert_close(batch.s * batch.norm[..., None], singular, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jd_full_objective_never_increases_and_matches_dense_reference(seed):
    A, B = random_factors(seed=seed)
    batch = canonicalize(A, B)
    r = 5
    U0, V0 = init_full(batch, r, generators(batch.num_modules, seed))
    result = jd_full(batch, U0, V0, max_iter=5000, tol=1e-11, record_history=True)
    W = normalised_dense(A, B)
    for m in range(batch.num_modules):
        history = result.history[m]
        assert len(history) >= 2
        assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(history)), history
        # Same start, exact dense alternation: the same stationary point (objective and subspaces).
        Ud, Vd, dense_error = dense_jd_reference(W[m], U0[m], V0[m])
        assert history[-1] == pytest.approx(dense_error, rel=1e-9, abs=1e-12)
        U, V = result.U[m], result.V[m]
        torch.testing.assert_close(U @ U.T, Ud @ Ud.T, atol=1e-6, rtol=0)
        torch.testing.assert_close(V @ V.T, Vd @ Vd.T, atol=1e-6, rtol=0)
        # Σ_i = Uᵀ ΔW̃_i V, and the objective is the dense one.
        torch.testing.assert_close(result.sigma[m], U.T @ W[m] @ V, atol=1e-12, rtol=0)
        dense_obj = sum((w - U @ U.T @ w @ V @ V.T).square().sum() for w in W[m])
        assert float(dense_obj) == pytest.approx(history[-1], abs=1e-10)


def test_jd_full_stops_on_subspace_change():
    A, B = random_factors(seed=3)
    batch = canonicalize(A, B)
    U0, V0 = init_full(batch, 5, generators(batch.num_modules))
    loose = jd_full(batch, U0, V0, max_iter=500, tol=1e-2)
    tight = jd_full(batch, U0, V0, max_iter=500, tol=1e-8)
    capped = jd_full(batch, U0, V0, max_iter=2, tol=1e-12)
    assert bool(loose.converged.all()) and bool(tight.converged.all())
    assert (loose.iterations < tight.iterations).all()
    assert capped.iterations.tolist() == [2, 2] and not bool(capped.converged.any())


def test_stall_rule_stops_a_flat_spectrum_early():
    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(1, 16, 4, 40, generator=g, dtype=F64), torch.randn(1, 16, 48, 4, generator=g, dtype=F64)
    batch = canonicalize(A, B)  # unrelated adapters: no dominant shared subspace
    U0, V0 = init_full(batch, 4, generators(1))
    patient = jd_full(batch, U0, V0, max_iter=2000, tol=1e-9, record_history=True)
    stalling = jd_full(batch, U0, V0, max_iter=2000, tol=1e-9, stall_tol=1e-3, record_history=True)
    assert bool(stalling.stalled.all()) and not bool(patient.stalled.any())
    assert int(stalling.iterations[0]) < int(patient.iterations[0])
    final, early = patient.history[0][-1], stalling.history[0][-1]
    assert final <= early <= final * 1.01  # it stopped where little was left to gain


def test_jd_diag_never_exceeds_its_initial_error_and_reports_dense_error():
    A, B = random_factors(seed=4)
    batch = canonicalize(A, B)
    U0, V0 = init_full(batch, 5, generators(batch.num_modules))
    full = jd_full(batch, U0, V0, max_iter=500, tol=1e-9)
    diag = jd_diag(batch, full.U, full.V, full.sigma, max_iter=500, tol=1e-12, record_history=True)
    W = normalised_dense(A, B)
    for m in range(batch.num_modules):
        history = diag.history[m]
        assert history[0] <= float(diag.initial_error[m]) + 1e-12
        assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(history))
        rebuilt = diag.U[m] @ torch.diag_embed(diag.sigma[m]) @ diag.V[m].T
        dense = float((W[m] - rebuilt).square().sum())
        assert dense == pytest.approx(history[-1], abs=1e-10)
        assert history[-1] < float(diag.initial_error[m])  # ALS improved on the rotated JD-Full start
        torch.testing.assert_close(diag.U[m].norm(dim=0), torch.ones(5, dtype=F64))  # rebalanced


def adapters_from(source: SyntheticSource) -> list[LoraAdapter]:
    return source.adapters()


def dense_errors(bundle, adapters):
    """{name: {module: ‖ΔW − Û Σ̂ V̂ᵀ‖² / ‖ΔW‖²}} by brute force on dense matrices."""
    out = {}
    for adapter in adapters:
        out[adapter.name] = {}
        for module in adapter.modules:
            dw = adapter.delta_weight(module)
            rebuilt = bundle.delta_weight(module, adapter.name)
            out[adapter.name][module] = float((dw - rebuilt).square().sum() / dw.square().sum())
    return out


def test_a_collection_in_one_shared_basis_is_recovered_exactly():
    source = SyntheticSource(MODULES, num_adapters=7, lora_rank=4, kind="shared", basis_rank=6, dtype=F64, seed=1)
    adapters = adapters_from(source)
    bundle = compress(adapters, rank=6, progress=False)
    assert bundle.report.overall.mean_error < 1e-10
    for errors in dense_errors(bundle, adapters).values():
        assert max(errors.values()) < 1e-10
    # With a smaller rank the same collection is not exact: the test can fail.
    assert compress(adapters, rank=3, progress=False).report.overall.mean_error > 1e-3


def test_rank_at_least_the_total_rank_is_lossless_with_mixed_ranks_and_missing_modules():
    source = SyntheticSource(MODULES, num_adapters=4, lora_rank=[2, 3, 4, 5], kind="random", dtype=F64, seed=2)
    adapters = adapters_from(source)
    # Adapter 1 lacks a module: it is an exact zero there and is not counted in its mean.
    adapters[1].modules.pop("layers.0.v_proj")
    bundle = compress(adapters, rank=14, progress=False)
    assert "layers.0.v_proj" not in bundle.report.per_adapter[adapters[1].name].modules
    assert float(bundle.delta_weight("layers.0.v_proj", adapters[1].name).abs().max()) == 0.0
    for name, errors in dense_errors(bundle, adapters).items():
        assert max(errors.values()) < 1e-10, name
        assert bundle.report.per_adapter[name].max_error < 1e-10
    # The stored rank is capped at the collection's total rank of each module.
    assert bundle.config.rank_for("layers.0.v_proj") == 2 + 4 + 5


@pytest.mark.parametrize(("method", "sigma", "clusters"), [("jd", "full", 1), ("jd", "diag", 1), ("jd", "full", 2)])
def test_reported_errors_equal_brute_force(method, sigma, clusters):
    source = SyntheticSource(MODULES, num_adapters=6, lora_rank=4, kind="families", noise=0.5, dtype=F64, seed=3)
    adapters = adapters_from(source)
    bundle = compress(adapters, rank=5, sigma=sigma, clusters=clusters, method=method, progress=False)
    dense = dense_errors(bundle, adapters)
    for name, entry in bundle.report.per_adapter.items():
        for module, error in entry.modules.items():
            assert error == pytest.approx(dense[name][module], abs=1e-10)
        assert entry.mean_error == pytest.approx(sum(dense[name].values()) / len(dense[name]), abs=1e-10)
    assert 0 < bundle.report.overall.mean_error < 1


def test_per_adapter_svd_is_the_eckart_young_truncation():
    source = SyntheticSource(MODULES, num_adapters=3, lora_rank=[4, 6, 2], kind="random", dtype=F64, seed=4)
    adapters = adapters_from(source)
    bundle = compress(adapters, rank=3, method="svd", progress=False)
    assert bundle.config.sigma_type == "diag" and bundle.config.num_clusters == 3
    assert bundle.config.adapter_clusters == [0, 1, 2] and bundle.report.method == "svd"
    for adapter in adapters:
        for module in adapter.modules:
            s = torch.linalg.svdvals(adapter.delta_weight(module))
            expected = float(s[3:].square().sum() / s.square().sum())
            got = bundle.report.per_adapter[adapter.name].modules[module]
            assert got == pytest.approx(expected, abs=1e-10)
            dense = adapter.delta_weight(module)
            rebuilt = bundle.delta_weight(module, adapter.name)
            assert float((dense - rebuilt).square().sum() / dense.square().sum()) == pytest.approx(expected, abs=1e-10)


def test_joint_beats_per_adapter_svd_at_equal_storage_on_shared_structure():
    modules = {"layers.0.q_proj": (64, 48), "layers.1.q_proj": (64, 48)}
    source = SyntheticSource(modules, num_adapters=12, lora_rank=8, kind="shared", basis_rank=8, noise=0.05, seed=5)
    adapters = adapters_from(source)
    joint = compress(adapters, rank=8, progress=False)
    svd = compress(adapters, rank=2, method="svd", progress=False)
    assert joint.report.size.params_bundle < svd.report.size.params_bundle
    assert joint.report.overall.mean_error < svd.report.overall.mean_error


def test_deterministic_and_independent_of_batching():
    source = SyntheticSource(MODULES, num_adapters=5, lora_rank=4, kind="random", seed=6)
    adapters = adapters_from(source)
    a = compress(adapters, rank=5, sigma="diag", seed=3, progress=False)
    b = compress(adapters, rank=5, sigma="diag", seed=3, progress=False)
    one_per_batch = compress(adapters, rank=5, sigma="diag", seed=3, progress=False, max_batch_bytes=1)
    for module in a.modules:
        for x, y, z in zip(
            (a.modules[module].U, a.modules[module].sigma),
            (b.modules[module].U, b.modules[module].sigma),
            (one_per_batch.modules[module].U, one_per_batch.modules[module].sigma),
        ):
            assert torch.equal(x, y)
            torch.testing.assert_close(x, z, atol=1e-4, rtol=1e-4)


def test_jd_diag_recovers_a_collection_with_shared_singular_vectors():
    """ΔW_i = U₀ diag(d_i) V₀ᵀ (each adapter using 3 of 6 shared directions): exact in a diagonal bundle of rank 6."""
    g = torch.Generator().manual_seed(0)
    k = 6
    shared = {
        m: (
            torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=F64)).Q,
            torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=F64)).Q,
        )
        for m, (d_out, d_in) in MODULES.items()
    }
    adapters = []
    for i in range(10):
        modules = {}
        for m, (U0, V0) in shared.items():
            idx = torch.randperm(k, generator=g)[:3]
            d = torch.randn(3, generator=g, dtype=F64)
            modules[m] = ((V0[:, idx] * d).T.contiguous(), U0[:, idx].contiguous())  # A [3, d_in], B [d_out, 3]
        adapters.append(LoraAdapter(f"a{i}", modules, dtype=F64))
    bundle = compress(adapters, rank=k, sigma="diag", progress=False)
    assert bundle.config.sigma_type == "diag" and next(iter(bundle.modules.values())).sigma.shape == (10, k)
    for errors in dense_errors(bundle, adapters).values():
        assert max(errors.values()) < 1e-10
