"""The metric code of benchmarks/fidelity.py and benchmarks/peers.py on hand-checked examples (fast, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


fidelity = load_benchmark("fidelity")
peers = load_benchmark("peers")


def test_exact_match_ignores_surrounding_and_repeated_whitespace_but_not_case():
    assert fidelity.exact_match("  not  spam ", "not spam") == 1.0
    assert fidelity.exact_match("Spam", "spam") == 0.0
    assert fidelity.exact_match("spam", "not spam") == 0.0


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("", "", 1.0),
        ("", "x", 0.0),
        ("a b c d", "x y", 0.0),
        # LCS "a c" = 2: precision 2/3, recall 2/4 -> F1 = 2·(2/3)(1/2)/(2/3 + 1/2) = 4/7
        ("a b c", "a x c y", 4 / 7),
        # order matters: LCS of "b a" and "a b" is 1 -> F1 = 1/2
        ("b a", "a b", 0.5),
        ("K AE1 T", "k ae1 t", 1.0),  # lower-cased, as ROUGE is
    ],
)
def test_rouge_l(prediction: str, target: str, expected: float):
    assert fidelity.rouge_l(prediction, target) == pytest.approx(expected)


def test_squared_relative_error_from_factors_matches_dense():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g)
    a2, b2 = torch.randn(3, 12, generator=g), torch.randn(9, 3, generator=g)
    a1, b1, a2, b2 = (t.double() for t in (a1, b1, a2, b2))
    dense = (b1 @ a1 - b2 @ a2).norm() ** 2 / (b1 @ a1).norm() ** 2
    assert peers.squared_relative_error((a1, b1), (a2, b2)) == pytest.approx(float(dense), rel=1e-9)
    assert peers.squared_relative_error((a1, b1), (a1, b1)) == pytest.approx(0.0, abs=1e-12)
    assert peers.squared_relative_error((a1, b1), (a1, 0.5 * b1)) == pytest.approx(0.25)  # a halved scaling


def test_summary_relative_performance():
    original = {
        "a": {"loss": 1.0, "exact_match": 0.5, "rouge_l": 0.8},
        "b": {"loss": 2.0, "exact_match": 0.0, "rouge_l": 0.4},
    }
    compressed = {
        "a": {"loss": 1.5, "exact_match": 0.25, "rouge_l": 0.8, "agreement": 0.5},
        "b": {"loss": 2.0, "exact_match": 0.0, "rouge_l": 0.2, "agreement": 1.0},
    }
    s = fidelity.summary(compressed, original)
    assert s["relative_exact_match"] == pytest.approx(0.5)  # 0.125 / 0.25
    assert s["relative_exact_match_per_task"] == pytest.approx(0.5)  # task b (original 0) left out
    assert s["relative_rouge_l"] == pytest.approx(0.5 / 0.6)
    assert s["loss_increase"] == pytest.approx(0.25)
    assert s["agreement"] == pytest.approx(0.75)
