"""Clusters: k-subspace alternation with one cluster per adapter for all modules."""

from __future__ import annotations

import pytest
import torch

from peft_jdlora.compression import compress
from peft_jdlora.compression.cluster import compact, kmeanspp_pick, reassign
from peft_jdlora.compression.synthetic import SyntheticSource

F64 = torch.float64
MODULES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (12, 20), "layers.1.q_proj": (24, 20)}


def families(num_adapters=9, families=3, noise=0.0, seed=0, basis_rank=4):
    source = SyntheticSource(
        MODULES,
        num_adapters=num_adapters,
        lora_rank=4,
        kind="families",
        families=families,
        basis_rank=basis_rank,
        noise=noise,
        dtype=F64,
        seed=seed,
    )
    return source, source.adapters()


def total_error(bundle) -> float:
    return sum(sum(e.modules.values()) for e in bundle.report.per_adapter.values())


def test_families_are_found_and_recovered_exactly():
    source, adapters = families()
    one = compress(adapters, rank=4, clusters=1, progress=False)
    three = compress(adapters, rank=4, clusters=3, progress=False)
    assert one.report.overall.mean_error > 0.1  # one basis of rank 4 cannot hold three families
    assert three.report.overall.mean_error < 1e-10
    assert three.config.num_clusters == 3 and three.report.num_clusters == 3
    # Adapters of one family share a cluster, different families do not.
    by_family: dict[int, set[int]] = {}
    for i, cluster in enumerate(three.config.adapter_clusters):
        by_family.setdefault(source.family(i), set()).add(cluster)
    assert all(len(c) == 1 for c in by_family.values())
    assert len({next(iter(c)) for c in by_family.values()}) == 3
    for name, entry in three.report.per_adapter.items():
        assert entry.cluster == three.config.adapter_clusters[three.config.adapter_names.index(name)]
    # Every module stores one basis per cluster, and every adapter is exact in its own cluster's basis.
    for module, factors in three.modules.items():
        assert factors.U.shape[0] == 3 and factors.V.shape[0] == 3
        for adapter in adapters:
            dense = adapter.delta_weight(module)
            error = (dense - three.delta_weight(module, adapter.name)).square().sum() / dense.square().sum()
            assert float(error) < 1e-10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_families_wider_than_one_adapter_are_found(seed):
    """Each adapter spans half of its family's subspace: a seed's own directions alone attract nobody, the grown
    seed (refitted on the adapters closest to it) does."""
    source = SyntheticSource(
        MODULES, num_adapters=12, lora_rank=4, kind="families", families=2, basis_rank=8, dtype=F64, seed=seed
    )
    bundle = compress(source.adapters(), rank=8, clusters=2, progress=False, seed=seed)
    assert bundle.report.overall.mean_error < 1e-10
    clusters = bundle.config.adapter_clusters
    assert all(
        (clusters[i] == clusters[j]) == (source.family(i) == source.family(j)) for i in range(12) for j in range(12)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_clusters", [2, 3])
def test_clusters_are_never_worse_than_one_basis_of_the_same_rank(seed, num_clusters):
    source = SyntheticSource(MODULES, num_adapters=8, lora_rank=4, kind="random", dtype=F64, seed=seed)
    adapters = source.adapters()
    one = compress(adapters, rank=4, progress=False, seed=seed)
    many = compress(adapters, rank=4, clusters=num_clusters, progress=False, seed=seed)
    assert total_error(many) <= total_error(one) + 1e-12
    assert many.report.iterations["cluster_passes"] >= 1


def test_clusters_with_diagonal_cores():
    _, adapters = families(noise=0.05)
    full = compress(adapters, rank=4, clusters=3, progress=False)
    diag = compress(adapters, rank=4, clusters=3, sigma="diag", progress=False)
    assert diag.config.sigma_type == "diag"
    assert diag.config.adapter_clusters == full.config.adapter_clusters
    assert next(iter(diag.modules.values())).sigma.shape == (9, 4)
    assert diag.report.overall.mean_error < 0.05


def test_auto_picks_the_smallest_count_meeting_the_target():
    _, adapters = families(num_adapters=8, families=2, noise=0.01)
    bundle = compress(adapters, rank=4, clusters="auto", target_error=0.01, progress=False)
    search = bundle.report.cluster_search
    assert [s["num_clusters"] for s in search] == [1, 2]
    assert search[0]["mean_error"] > 0.01 >= search[1]["mean_error"]
    assert bundle.config.num_clusters == 2
    assert bundle.report.overall.mean_error == pytest.approx(search[-1]["mean_error"])
    # A target met by one basis stops at one cluster.
    easy = compress(adapters, rank=4, clusters="auto", target_error=0.99, progress=False)
    assert easy.config.num_clusters == 1 and len(easy.report.cluster_search) == 1


def test_auto_stops_when_every_adapter_is_exact():
    _, adapters = families(num_adapters=4, families=2)
    bundle = compress(adapters, rank=4, clusters="auto", target_error=0.0, progress=False)
    assert bundle.config.num_clusters == 2
    assert bundle.report.overall.mean_error < 1e-10


def test_more_clusters_than_structure_are_not_created_from_exact_fits():
    _, adapters = families(num_adapters=6, families=2)
    bundle = compress(adapters, rank=4, clusters=5, progress=False)
    # After two clusters every adapter is exact: no adapter has error left to seed a third.
    assert bundle.config.num_clusters == 2


def test_assignment_helpers():
    errors = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]], dtype=F64)
    assert reassign(errors, torch.tensor([1, 0, 1])).tolist() == [0, 1, 1]  # the tie keeps cluster 1
    assignment, kept = compact(torch.tensor([2, 2, 0]), 3)
    assert assignment.tolist() == [1, 1, 0] and kept == [0, 2]
    g = torch.Generator().manual_seed(0)
    assert kmeanspp_pick(torch.zeros(3, dtype=F64), g) is None
    assert kmeanspp_pick(torch.tensor([0.0, 0.0, 1.0], dtype=F64), g) == 2
