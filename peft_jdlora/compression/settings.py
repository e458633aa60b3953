"""The settings of one compression: one typed object, validated once, from `compress(...)`'s keyword arguments or
`jdlora-convert`'s options to the engine and the budget planner.

A compression has a *shape*, either fixed (`rank`, `sigma`, `clusters`, `method`; `clusters="auto"` with
`target_error`) or a budget plan (`budget`: a size, or `"auto"` with `target_error`; the plan chooses the
representation, rank and clusters per module), and options of the fit and of where it runs. `CompressionSettings`
checks every value and every combination when it is made and raises `CompressionSettingsError`, whose message names
the settings at fault; `render` spells them as command-line options for the CLI. Nothing else validates settings.

This module imports no torch: the command line checks its options with it before the seconds torch takes to import.
Devices and dtypes are held by name ("cuda:1", "bfloat16"); the engine turns them into torch objects.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .cost import DEFAULT_BUDGET, DEFAULT_PLAN_CLUSTER_COUNTS, BudgetLike, parse_budget

DEFAULT_RANK = 16
DEFAULT_MAX_BATCH_BYTES = 256 * 2**20
DEFAULT_CLUSTER_COUNTS: tuple[int, ...] = (2, 4)
DEFAULT_CLUSTER_SAMPLE = 16
STORAGE_DTYPES = ("float32", "bfloat16", "float16", "float64")
COMPUTE_DTYPES = ("float32", "float64")
# The settings that make the shape of a bundle: given one, a refit (or the command line's default plan) replaces the
# whole shape rather than mixing two (a budget with a rank, say).
SHAPE_FIELDS = frozenset({"rank", "sigma", "clusters", "method", "target_error", "budget"})
_PLAN_FIELDS = ("target_error_every", "cluster_counts", "cluster_sample")
_FIXED_FIELDS = ("rank", "sigma", "clusters", "method")
_DEVICE_RE = re.compile(r"[A-Za-z_]+(:[0-9]+)?")
# «name» or «name=value» in an error message: a setting (and its value), spelled by `CompressionSettingsError.render`.
_NAME_RE = re.compile(r"«(\w+)(?:=([^»]*))?»")


def _name(setting: str, value: Any = dataclasses.MISSING) -> str:
    return f"«{setting}»" if value is dataclasses.MISSING else f"«{setting}={value!r}»"


def python_spelling(setting: str, value: Optional[str]) -> str:
    """`clusters='auto'`: a setting as a keyword argument of `compress`."""
    return setting if value is None else f"{setting}={value}"


class CompressionSettingsError(ValueError):
    """Compression settings with a value out of range or that do not go together.

    The message names the settings at fault as `compress` keyword arguments (`clusters='auto'`); `render` spells them
    otherwise, e.g. as the command line's options (`--clusters auto`). `settings` lists the settings it names.
    """

    def __init__(self, template: str):
        self.template = template
        self.settings = list(dict.fromkeys(m.group(1) for m in _NAME_RE.finditer(template)))
        super().__init__(self.render())

    def render(self, spell: Callable[[str, Optional[str]], str] = python_spelling) -> str:
        """The message with every setting spelled by `spell(setting, repr of its value or None)`."""
        return _NAME_RE.sub(lambda m: spell(m.group(1), m.group(2)), self.template)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class CompressionSettings:
    """How a collection is compressed (the keyword arguments of `compress`). Made once, checked once: a value out of
    range or settings that do not go together raise `CompressionSettingsError`, naming them.

    A fixed shape has `rank`, `sigma`, `clusters` and `method` set (their defaults filled in); a budget plan has them
    None. `options_given` holds the settings given explicitly (by default those that differ from their defaults): a
    refit keeps a bundle's own settings for the others (`with_options`).
    """

    rank: Optional[int] = field(
        default=None,
        metadata=_help(
            f"rank r of the shared basis per module (default {DEFAULT_RANK}; capped where more cannot help); for "
            "method='svd', the rank each adapter is truncated to"
        ),
    )
    sigma: Optional[str] = field(
        default=None,
        metadata=_help("'full' (Σ_i is r×r, JD-Full; the default) or 'diag' (Σ_i diagonal, JD-Diag from JD-Full)"),
    )
    clusters: Union[int, str, None] = field(
        default=None,
        metadata=_help(
            "number of shared bases per module (one cluster per adapter for all modules; default 1), or 'auto': the "
            "smallest number whose bundle meets target_error (mean over adapters of their mean module error)"
        ),
    )
    method: Optional[str] = field(
        default=None,
        metadata=_help(
            "'jd' (joint; the default) or 'svd' (per-adapter SVD: a singleton cluster per adapter with a diagonal "
            "core, served through the same format)"
        ),
    )
    target_error: Optional[float] = field(
        default=None, metadata=_help("the error clusters='auto' or budget='auto' must reach")
    )
    budget: Optional[BudgetLike] = field(
        default=None,
        metadata=_help(
            "a budget plan instead of a fixed shape: the bundle's size in bytes of the storage dtype (an int, or "
            "'4MB', '4MiB'), a ratio like '16x' (16 times smaller than the source adapters) or 'r16' (the size of "
            "the bundle rank=16 gives); representation, rank and clusters are chosen per module to minimise the mean "
            "error. 'auto': the smallest plan meeting target_error"
        ),
    )
    target_error_every: bool = field(
        default=False, metadata=_help("with budget='auto': every adapter (not the mean) must meet target_error")
    )
    cluster_counts: tuple[int, ...] = field(
        default=DEFAULT_CLUSTER_COUNTS,
        metadata=_help("cluster counts a budget plan considers besides one shared basis and per-adapter SVD"),
    )
    cluster_sample: int = field(
        default=DEFAULT_CLUSTER_SAMPLE,
        metadata=_help("modules a budget plan chooses its clusters on (and prunes the cluster counts it does not use)"),
    )
    max_iter: int = field(default=100, metadata=_help("iteration cap of JD-Full and JD-Diag"))
    tol: float = field(
        default=1e-3,
        metadata=_help("stopping tolerance: subspace change (JD-Full), relative objective decrease (JD-Diag)"),
    )
    stall_tol: float = field(
        default=1e-5,
        metadata=_help(
            "JD-Full also stops a module when an iteration lowers its error by less than this fraction (the "
            "subspaces of unrelated adapters drift for hundreds of iterations without changing the fit); 0 disables"
        ),
    )
    max_clusters: Optional[int] = field(
        default=None, metadata=_help("upper bound for clusters='auto' (default: the number of adapters)")
    )
    max_cluster_iter: int = field(default=20, metadata=_help("cap on fit/reassign passes of the cluster alternation"))
    seed: int = field(
        default=0, metadata=_help("seeds the random starts and the cluster seeding; results are deterministic given it")
    )
    device: Optional[str] = field(
        default=None, metadata=_help("where to compute, e.g. 'cpu', 'cuda:1' (default: CUDA when available)")
    )
    dtype: Optional[str] = field(
        default=None,
        metadata=_help(f"storage dtype of the bundle, one of {STORAGE_DTYPES} (default: the source adapters')"),
    )
    compute_dtype: Optional[str] = field(
        default=None,
        metadata=_help("dtype of the computation, float32 or float64 (default float32, or float64 for float64 data)"),
    )
    max_batch_bytes: int = field(default=DEFAULT_MAX_BATCH_BYTES, metadata=_help("memory budget of a batch of modules"))
    check_base_model: bool = field(default=True, metadata=_help("refuse adapters whose base_model_name_or_path differ"))
    options_given: Optional[frozenset[str]] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._normalise()
        if self.options_given is None:
            given = frozenset(f.name for f in _setting_fields() if getattr(self, f.name) != f.default)
            self._set("options_given", given)
        self._check_values()
        if self.budget is not None:
            self._check_plan()
        else:
            self._check_fixed()
            self._set("rank", DEFAULT_RANK if self.rank is None else self.rank)
            self._set("method", self.method or "jd")
            self._set("sigma", "diag" if self.method == "svd" else (self.sigma or "full"))
            self._set("clusters", 1 if self.clusters is None else self.clusters)

    # ---------------------------------------------------------------- checks

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _normalise(self) -> None:
        """Devices and dtypes by name (torch objects accepted), cluster counts as a tuple of ints."""
        if self.device is not None and not isinstance(self.device, str):
            self._set("device", str(self.device))
        for name in ("dtype", "compute_dtype"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                self._set(name, str(value).removeprefix("torch."))
        if isinstance(self.cluster_counts, Iterable) and not isinstance(self.cluster_counts, (str, bytes)):
            self._set("cluster_counts", tuple(self.cluster_counts))

    def _check_values(self) -> None:
        _check_int(self, "rank", optional=True)
        _check_choice(self, "sigma", ("full", "diag"))
        _check_choice(self, "method", ("jd", "svd"))
        if not (self.clusters is None or self.clusters == "auto" or _is_int(self.clusters, 1)):
            raise CompressionSettingsError(
                f"{_name('clusters')} must be a positive integer or 'auto', got {self.clusters!r}."
            )
        if self.target_error is not None and not (_is_number(self.target_error) and self.target_error >= 0):
            raise CompressionSettingsError(f"{_name('target_error')} must be a number >= 0, got {self.target_error!r}.")
        if self.budget is not None and self.budget != "auto":
            try:
                parse_budget(self.budget)
            except ValueError as err:
                raise CompressionSettingsError(f"{_name('budget')}: {err}") from None
        if not isinstance(self.cluster_counts, tuple) or not all(_is_int(c, 1) for c in self.cluster_counts):
            raise CompressionSettingsError(
                f"{_name('cluster_counts')} must be positive integers, got {self.cluster_counts!r}."
            )
        for name in ("cluster_sample", "max_iter", "max_cluster_iter", "max_batch_bytes"):
            _check_int(self, name)
        _check_int(self, "max_clusters", optional=True)
        if not _is_number(self.tol) or not self.tol > 0:
            raise CompressionSettingsError(f"{_name('tol')} must be a number > 0, got {self.tol!r}.")
        if not _is_number(self.stall_tol) or not self.stall_tol >= 0:
            raise CompressionSettingsError(f"{_name('stall_tol')} must be a number >= 0, got {self.stall_tol!r}.")
        if not _is_int(self.seed, None):
            raise CompressionSettingsError(f"{_name('seed')} must be an integer, got {self.seed!r}.")
        for name in ("target_error_every", "check_base_model"):
            if not isinstance(getattr(self, name), bool):
                raise CompressionSettingsError(f"{_name(name)} must be True or False, got {getattr(self, name)!r}.")
        if self.device is not None and not _DEVICE_RE.fullmatch(self.device):
            raise CompressionSettingsError(
                f"{_name('device')} must name a device such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}."
            )
        _check_choice(self, "dtype", STORAGE_DTYPES)
        _check_choice(self, "compute_dtype", COMPUTE_DTYPES)

    def _check_plan(self) -> None:
        fixed = [name for name in _FIXED_FIELDS if getattr(self, name) is not None]
        if fixed:
            dropped = ", ".join(_name(n) for n in fixed)
            raise CompressionSettingsError(
                f"{_name('budget')} chooses ranks, clusters and the representation per module itself; drop {dropped}."
            )
        if self.budget == "auto":
            if self.target_error is None:
                raise CompressionSettingsError(
                    f"{_name('budget', 'auto')} picks the smallest bundle meeting {_name('target_error')}: give one."
                )
        elif self.target_error is not None:
            raise CompressionSettingsError(
                f"a {_name('budget')} sets the size and {_name('target_error')} asks for the smallest plan meeting "
                f"it ({_name('budget', 'auto')}): give one of them."
            )
        if self.target_error_every and self.budget != "auto":
            raise CompressionSettingsError(
                f"{_name('target_error_every')} applies to {_name('budget', 'auto')}: every adapter, not the mean, "
                f"must meet {_name('target_error')}."
            )

    def _check_fixed(self) -> None:
        svd = self.method == "svd"
        if self.target_error_every:
            raise CompressionSettingsError(
                f"{_name('target_error_every')} applies to {_name('budget', 'auto')}: every adapter, not the mean, "
                f"must meet {_name('target_error')}."
            )
        if self.clusters == "auto":
            if svd:
                raise CompressionSettingsError(
                    f"{_name('clusters', 'auto')} applies to {_name('method', 'jd')}; per-adapter SVD has one basis "
                    "per adapter."
                )
            if self.target_error is None:
                raise CompressionSettingsError(
                    f"{_name('clusters', 'auto')} chooses the number of clusters from an error target: it needs "
                    f"{_name('target_error')} (the mean error the bundle must reach)."
                )
            return
        if svd and self.clusters not in (None, 1):
            raise CompressionSettingsError(
                f"per-adapter SVD ({_name('method', 'svd')}) has one basis per adapter; {_name('clusters')} do not "
                "apply."
            )
        if self.target_error is not None:
            fixed = [name for name in _FIXED_FIELDS if getattr(self, name) is not None]
            remedy = f"drop {', '.join(_name(n) for n in fixed)} or add" if fixed else "add"
            raise CompressionSettingsError(
                f"{_name('target_error')} is used with {_name('clusters', 'auto')} or {_name('budget', 'auto')}; "
                f"{remedy} {_name('clusters', 'auto')}."
            )

    # ---------------------------------------------------------------- use

    @property
    def is_plan(self) -> bool:
        """A budget plan (else a fixed shape)."""
        return self.budget is not None

    def with_options(self, **options: Any) -> CompressionSettings:
        """These settings with `options` over them, as the command line reads its options (None: not given).

        A shape option (`SHAPE_FIELDS`) replaces this shape whole (a refit of a plan bundle with `rank=8` is a
        fixed-rank bundle, not a plan with a rank); `target_error` without `clusters="auto"` and without a fixed shape
        asks for the smallest budget plan meeting it (`budget="auto"`). Checked like any settings.
        """
        unknown = sorted(set(options) - {f.name for f in _setting_fields()})
        if unknown:
            raise TypeError(f"unknown compression settings {unknown}.")
        given = {name: value for name, value in options.items() if value is not None}
        changes: dict[str, Any] = {}
        kept = set(self.options_given)
        if SHAPE_FIELDS & set(given):
            shape = SHAPE_FIELDS | set(_PLAN_FIELDS)
            changes = {f.name: f.default for f in _setting_fields() if f.name in shape}
            kept -= shape
            fixed = any(name in given for name in _FIXED_FIELDS)
            if "target_error" in given and "budget" not in given and not fixed:
                given["budget"] = "auto"
        changes.update(given)
        return dataclasses.replace(self, **changes, options_given=frozenset(kept | set(given)))

    def given(self) -> dict[str, Any]:
        """{setting: value} of the settings given explicitly (see `options_given`)."""
        return {name: getattr(self, name) for name in sorted(self.options_given)}

    def fixed_shape(self, *, rank: int, sigma: str = "full", clusters: Union[int, str] = 1) -> CompressionSettings:
        """These settings with a fixed JD shape instead of their own (a budget plan's engine runs)."""
        plan = {f.name: f.default for f in _setting_fields() if f.name in _PLAN_FIELDS}
        return dataclasses.replace(
            self, **plan, budget=None, target_error=None, rank=rank, sigma=sigma, clusters=clusters, method="jd"
        )


def _setting_fields() -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(CompressionSettings) if f.name != "options_given")


def _is_int(value: Any, minimum: Optional[int]) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(settings: CompressionSettings, name: str, optional: bool = False) -> None:
    value = getattr(settings, name)
    if not ((optional and value is None) or _is_int(value, 1)):
        raise CompressionSettingsError(f"{_name(name)} must be a positive integer, got {value!r}.")


def _check_choice(settings: CompressionSettings, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(settings, name)
    if value is not None and value not in choices:
        listed = " or ".join(repr(c) for c in choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
        raise CompressionSettingsError(f"{_name(name)} must be {listed}, got {value!r}.")


# What `jdlora-convert` builds when given no size or shape option: a budget plan of the size of `compress(rank=16)`
# that weighs per-adapter SVD against one shared basis on every module (see `cost.DEFAULT_BUDGET`).
CONVERT_DEFAULT = CompressionSettings(budget=DEFAULT_BUDGET, cluster_counts=DEFAULT_PLAN_CLUSTER_COUNTS)


__all__ = [
    "COMPUTE_DTYPES",
    "CONVERT_DEFAULT",
    "DEFAULT_CLUSTER_COUNTS",
    "DEFAULT_CLUSTER_SAMPLE",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_RANK",
    "SHAPE_FIELDS",
    "STORAGE_DTYPES",
    "CompressionSettings",
    "CompressionSettingsError",
    "python_spelling",
]
