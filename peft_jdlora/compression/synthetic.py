"""Synthetic LoRA collections with known structure, generated module by module (for tests and benchmarks).

    kind="shared"    ΔW_i = U₀ X_i Y_i V₀ᵀ + noise   one hidden basis pair (U₀, V₀) of rank `basis_rank` for everyone
    kind="families"  as "shared", with a basis pair per family; adapter i belongs to family i mod `families`
    kind="random"    independent Gaussian factors: no shared structure (the error floor of one basis is then about
                     1 − r/(N·r_i))

`decay` < 1 scales the j-th rank component of every adapter by decay**j, so that its spectrum falls off the way the
spectra of trained LoRAs do (a few directions carry most of the update; per-adapter SVD of low rank is then good).

Factors are drawn per module from a generator seeded with (seed, module name), so any subset of modules can be
generated alone, in any order, with memory for one batch of modules only: a 500-adapter collection of a 7B model
(tens of GB as fp32 factors) never has to exist at once.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal, Optional

import torch

from .engine import FactorSource
from .sources import LoraAdapter

Kind = Literal["shared", "families", "random"]


class SyntheticSource(FactorSource):
    """A synthetic collection as a `FactorSource`.

    Args:
        modules: {module: (d_out, d_in)}.
        num_adapters: N.
        lora_rank: rank r_i of every adapter, or a list of N ranks (mixed ranks).
        kind: "shared", "families" or "random" (see the module docstring).
        basis_rank: rank of each hidden basis ("shared", "families").
        families: number of families ("families").
        noise: relative size of the unstructured part added to the factors (0: exactly structured).
        decay: spectrum fall-off per rank component (1: flat, as drawn).
        seed: seeds everything.
        dtype: dtype the factors are generated in (and the default storage dtype).
    """

    def __init__(
        self,
        modules: dict[str, tuple[int, int]],
        num_adapters: int,
        lora_rank: int | Sequence[int] = 8,
        kind: Kind = "shared",
        basis_rank: int = 8,
        families: int = 2,
        noise: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        names: Optional[list[str]] = None,
        decay: float = 1.0,
    ):
        if kind not in ("shared", "families", "random"):
            raise ValueError(f"kind must be 'shared', 'families' or 'random', got {kind!r}.")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}.")
        self.decay = decay
        self._shapes = dict(modules)
        self.lora_ranks = [lora_rank] * num_adapters if isinstance(lora_rank, int) else list(lora_rank)
        if len(self.lora_ranks) != num_adapters:
            raise ValueError(f"lora_rank lists {len(self.lora_ranks)} ranks for {num_adapters} adapters.")
        self.kind, self.basis_rank, self.families, self.noise, self.seed = kind, basis_rank, families, noise, seed
        self.names = names or [f"synthetic_{i:04d}" for i in range(num_adapters)]
        self.dtype = dtype
        self.sources = [{"source": f"synthetic:{kind}", "seed": seed, "index": i} for i in range(num_adapters)]
        self.base_model = "synthetic"

    def family(self, index: int) -> int:
        return index % self.families if self.kind == "families" else 0

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def ranks(self) -> dict[str, list[int]]:
        return {m: list(self.lora_ranks) for m in self._shapes}

    def module_factors(self, module: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(A [r_i, d_in], B [d_out, r_i])] of every adapter at `module` (deterministic)."""
        d_out, d_in = self._shapes[module]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63))
        N, k = len(self.names), self.basis_rank
        num_bases = self.families if self.kind == "families" else 1
        if self.kind != "random":
            Us = [torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=self.dtype)).Q for _ in range(num_bases)]
            Vs = [torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=self.dtype)).Q for _ in range(num_bases)]
        out = []
        for i in range(N):
            r = self.lora_ranks[i]
            # Gaussian factors scaled like trained LoRAs: ‖ΔW‖ of order 1 whatever the width.
            noise_b = torch.randn(d_out, r, generator=g, dtype=self.dtype) / d_out**0.5
            noise_a = torch.randn(r, d_in, generator=g, dtype=self.dtype) / d_in**0.5
            if self.kind == "random":
                B, A = noise_b, noise_a
            else:
                f = self.family(i)
                X = torch.randn(k, r, generator=g, dtype=self.dtype) / k**0.5
                Y = torch.randn(r, k, generator=g, dtype=self.dtype) / k**0.5
                B = Us[f] @ X + self.noise * noise_b  # [d_out, r]
                A = Y @ Vs[f].T + self.noise * noise_a  # [r, d_in]
            if self.decay != 1.0:
                B = B * self.decay ** torch.arange(r, dtype=self.dtype)
            out.append((A, B))
        return out

    def load(self, modules: Sequence[str], rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        d_out, d_in = self._shapes[modules[0]]
        N = len(self.names)
        A = torch.zeros(len(modules), N, rank, d_in, dtype=dtype)
        B = torch.zeros(len(modules), N, d_out, rank, dtype=dtype)
        for j, module in enumerate(modules):
            for i, (a, b) in enumerate(self.module_factors(module)):
                A[j, i, : a.shape[0]] = a
                B[j, i, :, : b.shape[1]] = b
        return A, B

    def adapters(self) -> list[LoraAdapter]:
        """The collection as in-memory `LoraAdapter` objects (small collections only)."""
        per_module = {m: self.module_factors(m) for m in self._shapes}
        return [
            LoraAdapter(
                name=name,
                modules={m: per_module[m][i] for m in self._shapes},
                base_model=self.base_model,
                source=dict(self.sources[i]),
                dtype=self.dtype,
            )
            for i, name in enumerate(self.names)
        ]
