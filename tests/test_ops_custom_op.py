"""`torch.ops.peft_jdlora.jd_lora_delta`: a well-formed custom op (opcheck), equal to the brute-force reference,
and traceable by `torch.compile(fullgraph=True)` (what vLLM's compiled forward needs)."""

from __future__ import annotations

import pytest
import torch

import peft_jdlora.ops.custom_ops  # noqa: F401  (registers the op)


def _case(num_clusters: int, sigma_type: str, tokens: int = 7, adapters: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out, r = 12, 10, 4
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    U = torch.randn(num_clusters, d_out, r, generator=gen, dtype=torch.float64)
    V = torch.randn(num_clusters, r, d_in, generator=gen, dtype=torch.float64)
    shape = (adapters, r, r) if sigma_type == "full" else (adapters, r)
    sigma = torch.randn(shape, generator=gen, dtype=torch.float64)
    cluster = torch.arange(adapters) % num_clusters
    slots = torch.randint(-1, adapters, (tokens,), generator=gen)
    slots[0] = -1  # always a base row
    return x, slots, U, V, sigma, cluster


def _brute_force(x, slots, U, V, sigma, cluster):
    rows = []
    for t in range(x.shape[0]):
        a = int(slots[t])
        if a < 0:
            rows.append(torch.zeros(U.shape[1], dtype=x.dtype))
            continue
        core = sigma[a] if sigma.dim() == 3 else torch.diag(sigma[a])
        c = int(cluster[a])
        rows.append(U[c] @ core @ V[c] @ x[t])
    return torch.stack(rows)


CASES = [(1, "full"), (3, "full"), (1, "diag"), (4, "diag")]


@pytest.mark.parametrize(("num_clusters", "sigma_type"), CASES)
def test_op_matches_brute_force(num_clusters, sigma_type):
    args = _case(num_clusters, sigma_type)
    got = torch.ops.peft_jdlora.jd_lora_delta(*args)
    torch.testing.assert_close(got, _brute_force(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("num_clusters", "sigma_type"), CASES)
def test_opcheck(num_clusters, sigma_type):
    args = tuple(a.float() if a.is_floating_point() else a for a in _case(num_clusters, sigma_type))
    torch.library.opcheck(torch.ops.peft_jdlora.jd_lora_delta.default, args)


def test_compiles_with_fullgraph():
    args = tuple(a.float() if a.is_floating_point() else a for a in _case(3, "full"))
    base = torch.randn(args[0].shape[0], args[2].shape[1])

    def layer(x, slots, U, V, sigma, cluster, out):
        return out + torch.ops.peft_jdlora.jd_lora_delta(x, slots, U, V, sigma, cluster)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args, base), layer(*args, base))
