"""CompressionSettings: every value and combination checked once, errors naming the settings (as keyword arguments or
as the command line's options), the command line's reading of options, and what compress() does with them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from peft_jdlora.compression import CompressionSettings, CompressionSettingsError, compress
from peft_jdlora.compression.engine import Placement
from peft_jdlora.compression.settings import CONVERT_DEFAULT, DEFAULT_CLUSTER_COUNTS
from peft_jdlora.compression.synthetic import SyntheticSource

MODULES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (12, 20)}


def source(dtype=torch.float64):
    return SyntheticSource(MODULES, 4, lora_rank=2, kind="random", seed=0, dtype=dtype)


def test_a_fixed_shape_has_its_defaults_filled_and_a_plan_has_none():
    fixed = CompressionSettings()
    assert (fixed.rank, fixed.sigma, fixed.clusters, fixed.method) == (16, "full", 1, "jd")
    assert not fixed.is_plan and fixed.options_given == frozenset()
    assert CompressionSettings(method="svd", sigma="full").sigma == "diag"  # per-adapter SVD stores a diagonal core
    plan = CompressionSettings(budget="4x")
    assert plan.is_plan and (plan.rank, plan.sigma, plan.clusters, plan.method) == (None, None, None, None)
    assert plan.options_given == {"budget"}
    assert CompressionSettings(rank=16).options_given == {"rank"}  # given, although it is the default's value


@pytest.mark.parametrize(
    ("options", "message", "named"),
    [
        ({"rank": 0}, "rank must be a positive integer, got 0.", ["rank"]),
        ({"rank": True}, "rank must be a positive integer", ["rank"]),
        ({"sigma": "block"}, "sigma must be 'full' or 'diag', got 'block'.", ["sigma"]),
        ({"method": "pca"}, "method must be 'jd' or 'svd', got 'pca'.", ["method"]),
        ({"clusters": 0}, "clusters must be a positive integer or 'auto', got 0.", ["clusters"]),
        ({"target_error": -1.0}, "target_error must be a number >= 0", ["target_error"]),
        ({"budget": "16y"}, "budget: budget must be a number of bytes", ["budget"]),
        ({"cluster_counts": (2, 0)}, "cluster_counts must be positive integers", ["cluster_counts"]),
        ({"cluster_sample": 0}, "cluster_sample must be a positive integer", ["cluster_sample"]),
        ({"max_iter": 0}, "max_iter must be a positive integer", ["max_iter"]),
        ({"tol": 0.0}, "tol must be a number > 0", ["tol"]),
        ({"stall_tol": float("nan")}, "stall_tol must be a number >= 0", ["stall_tol"]),
        ({"seed": 1.5}, "seed must be an integer", ["seed"]),
        ({"device": "cuda 1"}, "device must name a device such as 'cpu'", ["device"]),
        ({"dtype": "int8"}, "dtype must be one of float32, bfloat16, float16, float64", ["dtype"]),
        ({"compute_dtype": torch.bfloat16}, "compute_dtype must be 'float32' or 'float64', got 'bfloat16'.", None),
        ({"check_base_model": "yes"}, "check_base_model must be True or False", ["check_base_model"]),
        ({"clusters": "auto"}, "clusters='auto' chooses the number of clusters", ["clusters", "target_error"]),
        ({"clusters": "auto", "method": "svd", "target_error": 0.1}, "clusters='auto' applies to method='jd'", None),
        ({"method": "svd", "clusters": 2}, "per-adapter SVD (method='svd') has one basis per adapter", None),
        ({"clusters": 2, "target_error": 0.1}, "target_error is used with clusters='auto' or budget='auto'", None),
        ({"target_error": 0.1}, "; add clusters='auto'.", None),
        ({"budget": "4x", "rank": 8, "clusters": 2}, "budget chooses ranks, clusters and the representation", None),
        ({"budget": "auto"}, "budget='auto' picks the smallest bundle meeting target_error: give one.", None),
        ({"budget": "4x", "target_error": 0.1}, "a budget sets the size and target_error asks", None),
        ({"budget": "4x", "target_error_every": True}, "target_error_every applies to budget='auto'", None),
        ({"target_error_every": True}, "target_error_every applies to budget='auto'", None),
    ],
)
def test_each_rule_is_checked_once_and_names_the_settings(options, message, named):
    with pytest.raises(CompressionSettingsError) as info:
        CompressionSettings(**options)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    if named is not None:
        assert info.value.settings == named


def test_the_command_line_spells_the_settings_as_its_options():
    from jdlora_hub.settings import option_spelling

    with pytest.raises(CompressionSettingsError) as info:
        CompressionSettings(budget="4x", rank=8, target_error_every=True)
    assert info.value.render(option_spelling) == (
        "--budget chooses ranks, clusters and the representation per module itself; drop --rank."
    )
    with pytest.raises(CompressionSettingsError) as info:
        CompressionSettings(clusters=2, target_error=0.1)
    assert info.value.render(option_spelling) == (
        "--target-error is used with --clusters auto or --budget auto; drop --clusters or add --clusters auto."
    )
    with pytest.raises(CompressionSettingsError) as info:
        CompressionSettings(target_error_every=True)
    assert info.value.render(option_spelling).startswith("--every-adapter applies to --budget auto")


def test_options_over_settings_replace_a_shape_whole():
    # No option: the base as it is (the command line's default plan).
    assert CONVERT_DEFAULT.with_options(seed=None, rank=None) == CONVERT_DEFAULT
    # A fixed shape over a plan is a fixed shape, with the plan's options back at their defaults.
    fixed = CONVERT_DEFAULT.with_options(rank=8, seed=3)
    assert (fixed.budget, fixed.rank, fixed.cluster_counts, fixed.seed) == (None, 8, DEFAULT_CLUSTER_COUNTS, 3)
    assert fixed.given() == {"rank": 8, "seed": 3}
    # A plan over a fixed shape drops the fixed rank; a target error alone is the smallest plan meeting it.
    assert CompressionSettings(rank=8, clusters=2).with_options(budget="3x").rank is None
    target = CompressionSettings(rank=8).with_options(target_error=0.05, target_error_every=True)
    assert (target.budget, target.target_error, target.target_error_every) == ("auto", 0.05, True)
    assert target.given() == {"budget": "auto", "target_error": 0.05, "target_error_every": True}
    # Options that are not a shape keep the base's shape (a refit keeps the bundle's).
    kept = CompressionSettings(budget="3x", cluster_counts=(2,)).with_options(dtype="bfloat16")
    assert (kept.budget, kept.cluster_counts, kept.dtype) == ("3x", (2,), "bfloat16")
    # Checked like any settings.
    with pytest.raises(CompressionSettingsError, match="target_error is used with"):
        CONVERT_DEFAULT.with_options(rank=8, target_error=0.1)
    with pytest.raises(TypeError, match="unknown compression settings"):
        CONVERT_DEFAULT.with_options(ranks=8)


def test_torch_objects_are_held_by_name():
    settings = CompressionSettings(device=torch.device("cpu"), dtype=torch.bfloat16, cluster_counts=[2])
    assert (settings.device, settings.dtype, settings.cluster_counts) == ("cpu", "bfloat16", (2,))
    assert settings.options_given == {"device", "dtype", "cluster_counts"}
    assert settings == replace(settings)  # frozen and comparable (options_given aside)


def test_placement_resolves_devices_and_dtypes():
    placement = Placement.of(CompressionSettings(device="cpu"), source(torch.float32))
    assert placement == Placement(torch.device("cpu"), torch.float32, torch.float32)
    placement = Placement.of(CompressionSettings(device="cpu", dtype="float64"), source(torch.float32))
    assert (placement.compute_dtype, placement.storage_dtype) == (torch.float64, torch.float64)
    with pytest.raises(CompressionSettingsError, match="device"):
        Placement.of(CompressionSettings(device="warp:0"), source())


def test_compress_takes_settings_or_keywords_and_checks_them_before_reading_adapters(tmp_path):
    settings = CompressionSettings(rank=3, device="cpu")
    one = compress(source(), settings, progress=False)
    other = compress(source(), rank=3, device="cpu", progress=False)
    assert one.report.overall == other.report.overall
    with pytest.raises(CompressionSettingsError, match="not both"):
        compress(source(), settings, rank=4, progress=False)
    # Bad settings are refused before a folder is read: the missing folder is never looked at.
    with pytest.raises(CompressionSettingsError, match="rank must be"):
        compress([tmp_path / "missing"], rank=0, progress=False)


def test_a_fixed_shape_for_a_plans_engine_runs():
    plan = CompressionSettings(budget="auto", target_error=0.1, target_error_every=True, cluster_counts=(3,), seed=5)
    fixed = plan.fixed_shape(rank=4, clusters=3)
    assert not fixed.is_plan and (fixed.rank, fixed.sigma, fixed.clusters, fixed.method, fixed.seed) == (
        4,
        "full",
        3,
        "jd",
        5,
    )


def test_the_command_line_checks_settings_without_importing_torch():
    code = (
        "import sys\n"
        "from jdlora_hub.settings import settings_module\n"
        "module = settings_module()\n"
        "settings = module.CONVERT_DEFAULT.with_options(budget='4x')\n"
        "print('torch' in sys.modules)\n"
        "import peft_jdlora.compression as compression\n"
        "print(compression.CompressionSettings is module.CompressionSettings, type(settings).__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True", "peft_jdlora.compression.settings"], done.stderr
