"""Joint compression of a collection into one shared basis per module: JD-Full and JD-Diag, from factors.

All functions work on a `CanonicalBatch` (M modules of one shape × N adapters, every update normalised to unit
norm), batched over the modules. Nothing of size d_out×d_in is formed; each iteration costs a few batched GEMMs of
[d, N·R] × [N·R, r], i.e. O(N·R·r·(d_in + d_out)) per module, and memory is linear in N.

JD-Full (U, V orthonormal; Σ_i = Uᵀ ΔW̃_i V is then optimal):

    maximise  Σ_i ‖Uᵀ ΔW̃_i V‖²_F      (= Σ_i 1 − error_i)

by alternating subspace-iteration half-steps, each with the other side fixed:

    U ← orth(Σ_i ΔW̃_i V Σ_iᵀ)   = orth(M_U U),  M_U = Σ_i ΔW̃_i V Vᵀ ΔW̃_iᵀ
    V ← orth(Σ_i ΔW̃_iᵀ U Σ_i)   = orth(M_V V),  M_V = Σ_i ΔW̃_iᵀ U Uᵀ ΔW̃_i

One step of subspace iteration on a PSD matrix never decreases tr(Uᵀ M U), so the objective never decreases; the fixed
points are those of the exact (eigen-decomposition) alternation. Stop when both subspaces move less than `tol`
(‖U − U_old U_oldᵀ U‖_F / √r) or at `max_iter`.

JD-Diag (Σ_i = diag(σ_i), U and V free): alternating least squares, each block solved exactly

    σ_i = G⁻¹ diag(Uᵀ ΔW̃_i V),            G = (UᵀU) ∘ (VᵀV)
    U   = [Σ_i ΔW̃_i V D_i] [(VᵀV) ∘ Σ_i σ_i σ_iᵀ]⁻¹
    V   = [Σ_i ΔW̃_iᵀ U D_i] [(UᵀU) ∘ Σ_i σ_i σ_iᵀ]⁻¹

then the columns of U and V are rescaled to unit norm (σ absorbs the scale). It starts from the JD-Full solution,
rotated inside the JD-Full subspaces so that the Σ_i are as diagonal as possible (a cheap r×r ALS on the Σ_i).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .svd import CanonicalBatch


@dataclass
class JointResult:
    """Result of one batched fit.  U: [M, d_out, r], V: [M, d_in, r]; sigma: [M, N, r, r] (full) or [M, N, r]
    (diag), in normalised units; iterations / converged: [M]; history: per module, the objective Σ_i error_i before
    each iteration and after the last one; initial_error: [M] error sum at the start (JD-Diag)."""

    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    history: list[list[float]] = field(default_factory=list)
    initial_error: Optional[torch.Tensor] = None
    stalled: Optional[torch.Tensor] = None


def orth(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of X [..., d, r] (Householder QR: orthonormal even if X is rank deficient)."""
    return torch.linalg.qr(X).Q


def subspace_change(U_old: torch.Tensor, U_new: torch.Tensor) -> torch.Tensor:
    """‖U_new − U_old U_oldᵀ U_new‖_F / √r for orthonormal [M, d, r] bases -> [M] (0: same subspace)."""
    residual = U_new - U_old @ (U_old.mT @ U_new)
    return residual.flatten(1).norm(dim=1) / U_new.shape[-1] ** 0.5


def solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ · rhs for symmetric PSD [.., r, r] matrices, with a ridge tiny enough not to change a
    well-posed solution but keeping a singular one (a component no adapter uses) finite (it then solves to 0)."""
    eps = torch.finfo(matrix.dtype).eps
    scale = matrix.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero matrix (no adapter, zero basis): solve to 0
    ridge = torch.diag_embed((10 * eps * scale).expand(matrix.shape[:-1]))
    return torch.linalg.solve(matrix + ridge, rhs)


def diagonal_cores(gram_u: torch.Tensor, gram_v: torch.Tensor, diag_t: torch.Tensor) -> torch.Tensor:
    """Least-squares diagonal cores σ = ((UᵀU)∘(VᵀV))⁻¹ diag(Uᵀ ΔW V) for bases with Gram matrices gram_u, gram_v
    [..., r, r] and diag_t = diag(Uᵀ ΔW V) [..., r] (leading dimensions broadcast) -> [..., r]."""
    return solve_spd(gram_u * gram_v, diag_t.unsqueeze(-1)).squeeze(-1)


def full_cores(gram_u: torch.Tensor, gram_v: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Least-squares full cores Σ = (UᵀU)⁻¹ T (VᵀV)⁻¹ for T = Uᵀ ΔW V [..., r, r] (leading dimensions broadcast)."""
    left = solve_spd(gram_u, T)  # (UᵀU)⁻¹ T
    return solve_spd(gram_v, left.mT).mT  # … (VᵀV)⁻¹ (VᵀV symmetric)


def core_products(batch: CanonicalBatch, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G_i = B̃_iᵀ U and H_i = Q_iᵀ V for all adapters: two batched GEMMs -> ([M, N, R, r], [M, N, R, r]).
    Uᵀ ΔW̃_i V = G_iᵀ H_i."""
    M, N, R = batch.s.shape
    r = U.shape[-1]
    G = (batch.B.mT @ U).view(M, N, R, r)
    H = (batch.Q.mT @ V).view(M, N, R, r)
    return G, H


def projected_cores(batch: CanonicalBatch, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """T_i = Uᵀ ΔW̃_i V for every adapter -> [M, N, r, r]."""
    G, H = core_products(batch, U, V)
    return G.mT @ H


# ------------------------------------------------------------------------------------------------ initialisation


def top_subspace(apply_k, apply_kt, omega: torch.Tensor, rank: int, power_iters: int = 2) -> torch.Tensor:
    """Top-`rank` left singular subspace of an implicit matrix K [M, d, n] by randomised subspace iteration.

    apply_k(X [M, n, p]) -> K·X [M, d, p]; apply_kt(Y [M, d, p]) -> Kᵀ·Y [M, n, p]; omega: [M, d, p] with p ≥ rank
    (oversampled). Rayleigh–Ritz on the final block picks the `rank` leading directions. Returns [M, d, rank].
    """
    Y = orth(apply_k(apply_kt(omega)))
    for _ in range(power_iters):
        Y = orth(apply_k(apply_kt(Y)))
    Z = apply_kt(Y)  # [M, n, p]
    _, vecs = torch.linalg.eigh(Z.mT @ Z)  # ascending eigenvalues of Yᵀ K Kᵀ Y
    return Y @ vecs[..., -rank:].flip(-1)


def init_full(
    batch: CanonicalBatch, rank: int, generators: list[torch.Generator], oversample: int = 8, power_iters: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial bases: the top-`rank` subspaces of the stacked (normalised) factors [B̃_1 … B̃_N] and
    [Q_1 diag(s_1) … Q_N diag(s_N)], i.e. the leading eigenvectors of Σ_i ΔW̃_i ΔW̃_iᵀ and Σ_i ΔW̃_iᵀ ΔW̃_i.

    `generators` (one per module, seeded from the module's name) draw the random start on the CPU, so the result does
    not depend on the device or on which other modules share the batch. Returns U [M, d_out, r], V [M, d_in, r].
    """
    M, d_out, _ = batch.B.shape
    d_in = batch.Q.shape[1]
    s_flat = batch.s.reshape(M, -1, 1)  # [M, N·R, 1]
    omega_u, omega_v = (_random_block(batch, generators, d, rank + oversample) for d in (d_out, d_in))
    U = top_subspace(lambda X: batch.B @ X, lambda Y: batch.B.mT @ Y, omega_u, rank, power_iters)
    V = top_subspace(lambda X: batch.Q @ (s_flat * X), lambda Y: s_flat * (batch.Q.mT @ Y), omega_v, rank, power_iters)
    return U, V


def _random_block(batch: CanonicalBatch, generators: list[torch.Generator], d: int, columns: int) -> torch.Tensor:
    """[M, d, min(d, columns)] Gaussian start of a range finder, drawn on the CPU from each module's generator (so it
    does not depend on the device or the batch), in the batch's dtype and device."""
    draws = [torch.randn(d, min(d, columns), generator=g, dtype=torch.float64) for g in generators]
    return torch.stack(draws).to(device=batch.B.device, dtype=batch.B.dtype)


def _without(basis: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Y − basis·(basisᵀ Y): the part of Y [M, d, p] outside the span of an orthonormal basis [M, d, k]."""
    return Y - basis @ (basis.mT @ Y)


def extend_bases(
    batch: CanonicalBatch,
    U: torch.Tensor,
    V: torch.Tensor,
    extra: int,
    generators: list[torch.Generator],
    oversample: int = 8,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases U [M, d_out, k], V [M, d_in, k] followed by `extra` directions each: the leading subspaces of
    what they leave out of the stacked factors, (I − UUᵀ)[B̃_1 … B̃_N] and (I − VVᵀ)[Q_1 diag(s_1) … Q_N diag(s_N)], by
    the randomised range finder of `init_full`. The first k columns span the given bases. Returns
    ([M, d_out, k + extra], [M, d_in, k + extra])."""
    M, d_out, _ = batch.B.shape
    d_in = batch.Q.shape[1]
    s_flat = batch.s.reshape(M, -1, 1)  # [M, N·R, 1]
    omega_u, omega_v = (_random_block(batch, generators, d, extra + oversample) for d in (d_out, d_in))
    U_extra = top_subspace(
        lambda X: _without(U, batch.B @ X), lambda Y: batch.B.mT @ _without(U, Y), omega_u, extra, power_iters
    )
    V_extra = top_subspace(
        lambda X: _without(V, batch.Q @ (s_flat * X)),
        lambda Y: s_flat * (batch.Q.mT @ _without(V, Y)),
        omega_v,
        extra,
        power_iters,
    )
    # Where nothing is left out (a lossless fit), the new columns are arbitrary: QR keeps them orthonormal and the
    # first k columns' span unchanged.
    return orth(torch.cat([U, U_extra], dim=-1)), orth(torch.cat([V, V_extra], dim=-1))


def subspace_batch(batch: CanonicalBatch, U: torch.Tensor, V: torch.Tensor) -> CanonicalBatch:
    """The updates seen inside orthonormal bases U [M, d_out, k], V [M, d_in, k]: the k×k cores T_i = Uᵀ ΔW̃_i V in
    canonical form (their SVD, at most the updates' rank R columns each), with the updates' own norms, so that for
    bases U·P, V·Q inside those subspaces the errors computed on it are the true errors, 1 − ‖Pᵀ T_i Q‖². JD-Full on
    it costs O(N·R·k·r) per iteration instead of O(N·R·(d_out + d_in)·r)."""
    T = projected_cores(batch, U, V)  # [M, N, k, k]
    W, S, Zh = torch.linalg.svd(T)
    R = min(batch.rank, S.shape[-1])
    M, N, k, _ = T.shape
    B = (W[..., :R] * S[..., None, :R]).permute(0, 2, 1, 3).reshape(M, k, N * R)
    Q = Zh[..., :R, :].mT.permute(0, 2, 1, 3).reshape(M, k, N * R)
    return CanonicalBatch(B, Q, S[..., :R], batch.norm)


def principal_axes(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal P, Q [M, r, r] with columns in decreasing order of Σ_i ‖S_iᵀ p‖² and Σ_i ‖S_i q‖² for cores
    S [M, N, r, r]: the eigenvectors of Σ_i S_i S_iᵀ and Σ_i S_iᵀ S_i. Rotating the bases by them puts the directions
    the cores use most first (and makes the cores as diagonal as one rotation can)."""
    _, P = torch.linalg.eigh((S @ S.mT).sum(1))
    _, Q = torch.linalg.eigh((S.mT @ S).sum(1))
    return P.flip(-1), Q.flip(-1)


def prefix_energy(batch: CanonicalBatch, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """[M, N, k] Σ_{a, b < j} (Uᵀ ΔW̃_i V)_{ab}²: what the first j columns of bases U [M, d_out, k], V [M, d_in, k]
    (orthonormal) keep of every update, for j = 1 … k (1 − the error of the rank-j bundle with projected cores)."""
    T = projected_cores(batch, U, V).square()  # [M, N, k, k]
    return T.cumsum(-1).cumsum(-2).diagonal(dim1=-2, dim2=-1)


# ------------------------------------------------------------------------------------------------ JD-Full


def jd_full(
    batch: CanonicalBatch,
    U: torch.Tensor,
    V: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    stall_tol: float = 0.0,
    record_history: bool = False,
) -> JointResult:
    """Alternating subspace iteration from bases U [M, d_out, r], V [M, d_in, r] (orthonormal).

    A module stops when both subspaces move less than `tol`, when it is lossless, or (with `stall_tol` > 0) when an
    iteration lowered its error sum by less than `stall_tol` times that sum: on a flat spectrum (unrelated adapters)
    the subspaces keep drifting for hundreds of iterations while the fit no longer changes. Modules stop
    individually (a stopped module's bases are frozen), so a module's result does not depend on the other modules in
    the batch. Returns the bases and Σ_i = Uᵀ ΔW̃_i V [M, N, r, r].
    """
    M = batch.num_modules
    U, V = U.clone(), V.clone()
    energy = batch.energy  # [M, N]
    total = energy.sum(1)  # [M]
    iterations = torch.zeros(M, dtype=torch.int64)
    # Nothing to fit where no adapter has the module (warm-started bases stay as they are).
    done = (total == 0).cpu()
    converged = done.clone()
    stalled = torch.zeros(M, dtype=torch.bool)
    previous = torch.full((M,), float("inf"), dtype=U.dtype, device=U.device)
    history: list[list[float]] = [[] for _ in range(M)]
    lossless_tol = 1e-12 if U.dtype == torch.float64 else 1e-6
    for _ in range(max_iter):
        active = (~done).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        idx = active.to(U.device)
        sub = batch if active.numel() == M else batch.modules(idx)
        Ua, Va = U[idx], V[idx]
        m, N, R = sub.s.shape
        r = Ua.shape[-1]
        G, H = core_products(sub, Ua, Va)
        S = G.mT @ H  # [m, N, r, r]  Σ_i = Uᵀ ΔW̃_i V
        error = total[idx] - S.square().sum((1, 2, 3))  # [m] Σ_i error_i at the current bases
        if stall_tol > 0:
            # The last iteration gained (almost) nothing: keep these bases and stop the module.
            stall = (previous[idx] - error < stall_tol * error).cpu()
            previous[idx] = error
            if bool(stall.any()):
                stalled[active[stall]] = converged[active[stall]] = done[active[stall]] = True
                keep = ~stall
                if not bool(keep.any()):
                    continue
                kept = keep.nonzero().squeeze(1).to(U.device)
                active, idx, sub, m = active[keep], idx[kept], sub.modules(kept), int(keep.sum())
                Ua, Va, G, H, S, error = Ua[kept], Va[kept], G[kept], H[kept], S[kept], error[kept]
        U_new = orth(sub.B @ (H @ S.mT).reshape(m, N * R, r))  # Σ_i ΔW̃_i V Σ_iᵀ
        G = (sub.B.mT @ U_new).view(m, N, R, r)
        S = G.mT @ H  # Σ_i with the new U and the old V
        V_new = orth(sub.Q @ (G @ S).reshape(m, N * R, r))  # Σ_i ΔW̃_iᵀ U Σ_i
        change = torch.maximum(subspace_change(Ua, U_new), subspace_change(Va, V_new))
        U[idx], V[idx] = U_new, V_new
        iterations[active] += 1
        # Lossless fits have no well-defined subspace to converge to (the extra directions are arbitrary): stop too.
        stop = ((change < tol) | (error <= lossless_tol * total[idx])).cpu()
        if record_history:
            for j, e in zip(active.tolist(), error.tolist()):
                history[j].append(e)
        converged[active] = stop
        done[active] = stop
    S = projected_cores(batch, U, V)
    if record_history:
        final = (total - S.square().sum((1, 2, 3))).tolist()
        for j in range(M):
            history[j].append(final[j])
    return JointResult(U, V, S, iterations, converged, history, stalled=stalled)


# ------------------------------------------------------------------------------------------------ JD-Diag


def _als(
    B: torch.Tensor,
    Q: torch.Tensor,
    num_adapters: int,
    energy: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    record_history: bool,
) -> JointResult:
    """ALS for Σ_i ‖B_i Q_iᵀ − U diag(σ_i) Vᵀ‖² with B: [M, d_out, N·R], Q: [M, d_in, N·R] (Q_i orthonormal),
    energy: [M, N] ‖B_i Q_iᵀ‖². Monotone: every block update is an exact least-squares solve."""
    M, NR = B.shape[0], B.shape[2]
    N, R, r = num_adapters, NR // num_adapters, U.shape[-1]
    U, V = U.clone(), V.clone()
    total = energy.sum(1)
    iterations = torch.zeros(M, dtype=torch.int64)
    done = (total == 0).cpu()
    converged = done.clone()
    history: list[list[float]] = [[] for _ in range(M)]
    previous = torch.full((M,), float("inf"), dtype=U.dtype, device=U.device)

    def sigma_step(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, Q: torch.Tensor, total: torch.Tensor):
        m = U.shape[0]
        G = (B.mT @ U).view(m, N, R, r)
        H = (Q.mT @ V).view(m, N, R, r)
        d = (G * H).sum(2)  # [m, N, r]  diag(Uᵀ ΔW_i V)
        sigma = diagonal_cores((U.mT @ U).unsqueeze(1), (V.mT @ V).unsqueeze(1), d)  # [m, N, r]
        error = total - (sigma * d).sum((1, 2))  # at the LS σ, σᵀGσ = σᵀd
        return sigma, error, G, H

    for _ in range(max_iter):
        active = (~done).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        idx = active.to(U.device)
        full = active.numel() == M
        Ba, Qa = (B, Q) if full else (B[idx], Q[idx])
        Ua, Va, tot = U[idx], V[idx], total[idx]
        m = Ua.shape[0]
        sigma, error, _, H = sigma_step(Ua, Va, Ba, Qa, tot)
        if record_history:
            for j, e in zip(active.tolist(), error.tolist()):
                history[j].append(e)
        stop = (previous[idx] - error <= tol * error.abs().clamp_min(torch.finfo(error.dtype).tiny)).cpu()
        previous[idx] = error
        ss = sigma.mT @ sigma  # [m, r, r]  Σ_i σ_i σ_iᵀ
        Y = Ba @ (H * sigma.unsqueeze(2)).reshape(m, NR, r)  # Σ_i ΔW_i V D_i
        Ua = solve_spd((Va.mT @ Va) * ss, Y.mT).mT
        G = (Ba.mT @ Ua).view(m, N, R, r)
        Z = Qa @ (G * sigma.unsqueeze(2)).reshape(m, NR, r)  # Σ_i ΔW_iᵀ U D_i
        Va = solve_spd((Ua.mT @ Ua) * ss, Z.mT).mT
        # Rebalance: unit columns keep U and V well scaled (σ absorbs the scale at the next σ-step).
        Ua = Ua / Ua.norm(dim=1, keepdim=True).clamp_min(torch.finfo(Ua.dtype).tiny)
        Va = Va / Va.norm(dim=1, keepdim=True).clamp_min(torch.finfo(Va.dtype).tiny)
        U[idx], V[idx] = Ua, Va
        iterations[active] += 1
        converged[active] = stop
        done[active] = stop
    sigma, error, _, _ = sigma_step(U, V, B, Q, total)
    if record_history:
        for j, e in enumerate(error.tolist()):
            history[j].append(e)
    return JointResult(U, V, sigma, iterations, converged, history)


def jd_diag(
    batch: CanonicalBatch,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    record_history: bool = False,
) -> JointResult:
    """JD-Diag from a JD-Full solution (U [M, d_out, r], V [M, d_in, r] orthonormal, S [M, N, r, r] = Uᵀ ΔW̃_i V).

    1. Rotate inside the JD-Full subspaces (principal axes of the cores, or none, whichever fits better).
    2. ALS on the r×r cores: by Pythagoras, ‖ΔW̃_i − U P D_i Qᵀ Vᵀ‖² = ‖ΔW̃_i‖² − ‖S_i‖² + ‖S_i − P D_i Qᵀ‖², so
       this minimises the true error restricted to the JD-Full subspaces at O(N·r³) per iteration.
    3. ALS on the full factors from U P, V Q.

    `initial_error` [M] is the error sum after step 1; the result's error is never above it. Returns U, V with unit
    columns and sigma [M, N, r] (normalised units).
    """
    M, N, r, _ = S.shape
    energy = batch.energy
    outside = energy.sum(1) - S.square().sum((1, 2, 3))  # [M] error of JD-Full: lost outside the subspaces
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    P, Qr = principal_axes(S)  # exact for one adapter, or for cores with shared singular vectors

    def core_error(P: torch.Tensor, Qr: torch.Tensor) -> torch.Tensor:
        diag = (P.mT.unsqueeze(1) @ S @ Qr.unsqueeze(1)).diagonal(dim1=-2, dim2=-1)  # [M, N, r]
        return outside + S.square().sum((1, 2, 3)) - diag.square().sum((1, 2))

    identity = eye.expand(M, r, r)
    use_rotation = (core_error(P, Qr) < core_error(identity, identity)).view(M, 1, 1)
    P = torch.where(use_rotation, P, identity)
    Qr = torch.where(use_rotation, Qr, identity)
    initial_error = core_error(P, Qr)
    # Step 2: the cores as a collection of r×r updates S_i = S_i · I (B = [S_1 … S_N], Q = [I … I]).
    core_B = S.permute(0, 2, 1, 3).reshape(M, r, N * r)
    core_Q = eye.repeat(1, N).expand(M, r, N * r)
    core = _als(
        core_B,
        core_Q,
        N,
        S.square().sum((2, 3)),
        P,
        Qr,
        max_iter=max_iter,
        tol=tol,
        record_history=False,
    )
    # Step 3: lift into the full space and refine there.
    result = _als(
        batch.B,
        batch.Q,
        N,
        energy,
        U @ core.U,
        V @ core.V,
        max_iter=max_iter,
        tol=tol,
        record_history=record_history,
    )
    result.initial_error = initial_error
    result.iterations = result.iterations + core.iterations
    return result
