"""Concurrent calls on one model: every thread gets exactly its own adapters (issue 13.1).

Each test runs real threads on one tiny model. A barrier inside the model (a pre-hook on the second decoder layer,
first pass only) holds every thread until all of them are inside their call, so the calls always overlap: every
call's routing is live while the others run their layers. Results are compared with single-threaded runs.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import random_bundle, tiny_llama, token_ids
from peft import PeftModel

import peft_jdlora
from peft_jdlora import save_bundle

TIMEOUT_S = 60


@pytest.fixture
def served(tmp_path):
    """A bundle of 4 adapters on a tiny Llama, with a default adapter for rows given no id."""
    bundle = random_bundle(tiny_llama(), num_adapters=4, num_clusters=2, scale=2.0)
    save_bundle(bundle, tmp_path / "bundle")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "bundle").eval()
    model.set_default_adapter("task_02")
    return model


def run_overlapping(hold_at: torch.nn.Module, calls: list) -> list:
    """Run every call (a function of no arguments) in its own thread; each waits at `hold_at` (a module inside the
    model, first pass only) until all of them got there, so that the calls overlap."""
    barrier = threading.Barrier(len(calls), timeout=TIMEOUT_S)
    seen = threading.local()

    def hold_until_all_inside(module, args):
        if not getattr(seen, "entered", False):
            seen.entered = True
            barrier.wait()

    handle = hold_at.register_forward_pre_hook(hold_until_all_inside)
    results, errors = [None] * len(calls), [None] * len(calls)

    def worker(i):
        try:
            with torch.no_grad():
                results[i] = calls[i]()
        except BaseException as err:  # reported below, with the thread's index
            errors[i] = err
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
    finally:
        handle.remove()
    failed = [(i, e) for i, e in enumerate(errors) if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    assert not failed, f"calls failed in threads: {failed}"
    assert all(e is None for e in errors), errors
    return results


def second_layer(peft_model: PeftModel) -> torch.nn.Module:
    return peft_model.get_base_model().model.layers[1]


# Different adapter ids, different batch sizes, calls without ids (the default adapter), base-only rows.
FORWARD_CALLS = [
    (token_ids(3, 5, 0), ["task_00", None, 3]),
    (token_ids(2, 5, 1), None),
    (token_ids(5, 7, 2), [1, 1, None, 0, "task_03"]),
    (token_ids(1, 4, 3), [None]),
    (token_ids(4, 5, 4), torch.tensor([3, 2, 1, 0])),
]


def test_concurrent_forwards_each_get_their_own_adapters(served):
    with torch.no_grad():
        expected = [served(input_ids=x, adapter_ids=ids).logits for x, ids in FORWARD_CALLS]
    calls = [lambda x=x, ids=ids: served(input_ids=x, adapter_ids=ids).logits for x, ids in FORWARD_CALLS]
    for _ in range(2):  # the second round reuses whatever the first left behind
        results = run_overlapping(second_layer(served), calls)
        for got, want in zip(results, expected):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    base = tiny_llama()
    with torch.no_grad():  # the rows meant for the base model really are the base model's
        torch.testing.assert_close(results[3], base(input_ids=FORWARD_CALLS[3][0]).logits, atol=0, rtol=0)


def test_concurrent_calls_of_one_shape_do_not_mix_adapters(served):
    # Same shapes, so nothing can fail on a row count: a shared routing state would silently swap adapters.
    jobs = [(token_ids(2, 5, 30 + i), ids) for i, ids in enumerate([[None, None], [0, 1], [3, 3], None])]
    with torch.no_grad():
        expected = [served(input_ids=x, adapter_ids=ids).logits for x, ids in jobs]
        base = tiny_llama()(input_ids=jobs[0][0]).logits
    torch.testing.assert_close(expected[0], base, atol=0, rtol=0)
    results = run_overlapping(
        second_layer(served), [lambda j=j: served(input_ids=j[0], adapter_ids=j[1]).logits for j in jobs]
    )
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_concurrent_generates_with_beams_and_different_batches(served):
    def generate(x, ids, **kwargs):
        return served.generate(
            input_ids=x, adapter_ids=ids, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, do_sample=False, **kwargs
        )

    jobs = [
        (token_ids(3, 5, 10), ["task_01", None, 0], {}),
        (token_ids(2, 6, 11), None, {"num_beams": 2}),
        (token_ids(2, 5, 12), [3, "task_02"], {"num_beams": 3, "num_return_sequences": 2}),
        (token_ids(4, 4, 13), [None, None, 1, 2], {}),
    ]
    expected = [generate(x, ids, **kw) for x, ids, kw in jobs]
    results = run_overlapping(second_layer(served), [lambda j=j: generate(j[0], j[1], **j[2]) for j in jobs])
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_concurrent_use_adapter_ids_on_a_transformers_model(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=3, scale=2.0)
    save_bundle(bundle, tmp_path / "bundle")
    model = tiny_llama()
    model.load_adapter(str(tmp_path / "bundle"), adapter_name="jd")
    jobs = [(token_ids(2, 5, 20), [2, None]), (token_ids(3, 5, 21), [0, 1, 2]), (token_ids(1, 6, 22), [1])]

    def forward(x, ids):
        with peft_jdlora.use_adapter_ids(model, ids):
            return model(x).logits

    with torch.no_grad():
        expected = [forward(x, ids) for x, ids in jobs]
    results = run_overlapping(model.model.layers[1], [lambda j=j: forward(*j) for j in jobs])
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
