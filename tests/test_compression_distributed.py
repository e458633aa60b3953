"""Modules split over two CPU processes (torch.distributed, gloo): the same bundle as one process, on rank 0."""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peft_jdlora.bundle import load_bundle, save_bundle
from peft_jdlora.compression import compress
from peft_jdlora.compression.engine import plan_groups
from peft_jdlora.compression.synthetic import SyntheticSource

MODULES = {
    "layers.0.q_proj": (24, 20),
    "layers.0.v_proj": (12, 20),
    "layers.1.q_proj": (24, 20),
    "layers.1.v_proj": (12, 20),
}
KWARGS = {"rank": 4, "sigma": "diag", "clusters": 2, "seed": 7, "progress": False, "max_batch_bytes": 1}


def collection():
    return SyntheticSource(MODULES, num_adapters=6, lora_rank=3, kind="families", noise=0.2, seed=5).adapters()


def _worker(rank: int, world_size: int, folder: str, kwargs: dict = KWARGS) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        bundle = compress(collection(), **kwargs)
        if rank == 0:
            save_bundle(bundle, os.path.join(folder, "bundle"))
        else:
            with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
                json.dump({"returned_none": bundle is None}, f)
    finally:
        dist.destroy_process_group()


def test_plan_splits_modules_over_processes():
    ranks = {m: [4, 4] for m in MODULES}
    groups = plan_groups(MODULES, ranks, "jd", 4, world_size=2, itemsize=4, max_batch_bytes=1)
    assert sorted(m for g in groups for m in g.modules) == sorted(MODULES)
    assert {g.owner for g in groups} == {0, 1}
    assert all(len(g.modules) == 1 for g in groups)
    one_batch_per_shape = plan_groups(MODULES, ranks, "jd", 4, world_size=1, itemsize=4, max_batch_bytes=2**30)
    assert len(one_batch_per_shape) == 2


def test_two_gloo_processes_give_the_single_process_bundle(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = compress(collection(), **KWARGS)
    finally:
        torch.set_num_threads(threads)
    # fork: the children inherit the imported modules (spawn would spend most of the test re-importing PEFT).
    context = mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises if a child failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 120 s")
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"returned_none": True}
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.report.world_size == 2
    assert bundle.config.adapter_names == reference.config.adapter_names
    assert bundle.config.adapter_clusters == reference.config.adapter_clusters
    assert bundle.config.num_clusters == reference.config.num_clusters == 2
    assert sorted(bundle.modules) == sorted(MODULES)
    for module in reference.modules:
        for name in bundle.config.adapter_names:
            torch.testing.assert_close(
                bundle.delta_weight(module, name), reference.delta_weight(module, name), atol=1e-5, rtol=1e-5
            )
    assert bundle.report.overall.mean_error == pytest.approx(reference.report.overall.mean_error, rel=1e-4)


def test_budget_plan_over_two_gloo_processes_is_the_single_process_plan(tmp_path):
    """Cluster search, curves and the build are split over the processes; the curves are shared, so both take the
    plan one process takes, and rank 0 returns the same bundle."""
    kwargs = {"budget": "3x", "cluster_counts": (2,), "seed": 7, "progress": False, "max_batch_bytes": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = compress(collection(), **kwargs)
    finally:
        torch.set_num_threads(threads)
    context = mp.start_processes(_worker, args=(2, str(tmp_path), kwargs), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 120 s")
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"returned_none": True}
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.report.world_size == 2 and bundle.report.method == "budget"
    assert bundle.report.plan == reference.report.plan
    assert bundle.config.to_dict() == reference.config.to_dict()
    for module in reference.modules:
        for name in bundle.config.adapter_names:
            torch.testing.assert_close(
                bundle.delta_weight(module, name), reference.delta_weight(module, name), atol=1e-5, rtol=1e-5
            )
