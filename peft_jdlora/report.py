"""The fidelity report of a bundle (`jdlora_report.json`), as one type: `BundleReport`.

The compression assembles it (`compression.metrics.compression_report`, for fixed shapes and budget plans alike);
`project`, `remove` and an adapter trained in the bundle's basis update it through its methods; the jdlora tools add
their verification and training records; the model card, `jdlora inspect`, verification, the tools and the benchmarks
read it through its fields. On disk it is `to_dict()` as JSON, written once per bundle folder.

Format: the keys are those reports had before this type, plus `report_version` (`REPORT_VERSION`; reports written
without one read as version 0, the same keys). `from_dict` checks the type of every field it knows, raising
`BundleFormatError` naming the field, and keeps the keys it does not know (`extra`), written back as they were: a
report from a newer writer loses nothing on a round trip.

Errors are the paper's squared relative error ‖ΔW − ΔŴ‖² / ‖ΔW‖² per adapter and module; an adapter's error is the
mean over its modules, the bundle's the mean over adapters.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .config import BundleFormatError

REPORT_NAME = "jdlora_report.json"
REPORT_VERSION = 1


# ------------------------------------------------------------------------------------------------ reading helpers


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS = {
    "number": (_number, "a number"),
    "integer": (_integer, "an integer"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "cluster": (lambda v: _integer(v) or isinstance(v, str), "an integer or 'auto'"),
}


def _read(data: Mapping[str, Any], key: str, kind: str, where: str) -> Any:
    """data[key] if it is of `kind` (None when absent or null); `BundleFormatError` naming the field otherwise."""
    value = data.get(key)
    if value is None:
        return None
    check, described = _CHECKS[kind]
    if not check(value):
        raise BundleFormatError(f"{where}: field {key!r} must be {described}, got {type(value).__name__}.")
    return value


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


# ------------------------------------------------------------------------------------------------ parts


@dataclass
class AdapterReport:
    """One adapter's fidelity: the mean and largest error over its modules (None: not computed), its cluster in the
    default assignment, {module: error}; the parameters of its source LoRA; how it entered the bundle (`projected`
    by `jdlora add`, `trained_in_basis` by `jdlora train`: what was trained, with which data)."""

    mean_error: Optional[float] = None
    max_error: Optional[float] = None
    cluster: Optional[int] = None
    modules: dict[str, float] = field(default_factory=dict)
    params: Optional[int] = None
    projected: bool = False
    trained_in_basis: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_errors(cls, errors: Mapping[str, float], cluster: int, params: Optional[int] = None) -> AdapterReport:
        """From {module: error} of the modules the adapter has."""
        values = [float(e) for e in errors.values()]
        return cls(
            mean_error=sum(values) / len(values) if values else 0.0,
            max_error=max(values) if values else 0.0,
            cluster=int(cluster),
            modules={m: float(e) for m, e in sorted(errors.items())},
            params=params,
        )

    @property
    def has_error(self) -> bool:
        """The error is known and finite."""
        return _finite(self.mean_error)

    def to_dict(self) -> dict[str, Any]:
        out = {**self.extra, **_without_none({"mean_error": self.mean_error, "max_error": self.max_error})}
        out.update(_without_none({"cluster": self.cluster, "params": self.params}))
        out["modules"] = dict(self.modules)
        if self.projected:
            out["projected"] = True
        if self.trained_in_basis is not None:
            out["trained_in_basis"] = dict(self.trained_in_basis)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> AdapterReport:
        if not isinstance(data, dict):
            raise BundleFormatError(f"{where} must be an object, got {type(data).__name__}.")
        modules = _read(data, "modules", "object", where) or {}
        bad = [m for m, e in modules.items() if not _number(e)]
        if bad:
            raise BundleFormatError(f"{where}: the error of module {bad[0]!r} must be a number.")
        known = {"mean_error", "max_error", "cluster", "modules", "params", "projected", "trained_in_basis"}
        return cls(
            mean_error=_read(data, "mean_error", "number", where),
            max_error=_read(data, "max_error", "number", where),
            cluster=_read(data, "cluster", "integer", where),
            modules={m: float(e) for m, e in modules.items()},
            params=_read(data, "params", "integer", where),
            projected=bool(_read(data, "projected", "bool", where)),
            trained_in_basis=_read(data, "trained_in_basis", "object", where),
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass
class OverallFidelity:
    """The bundle's fidelity: the mean of its adapters' errors, the worst adapter (largest error) and its error, and
    the largest error of any adapter at any module."""

    mean_error: Optional[float] = None
    worst_adapter: Optional[str] = None
    worst_error: Optional[float] = None
    max_module_error: Optional[float] = None

    @classmethod
    def of(cls, per_adapter: Mapping[str, AdapterReport]) -> OverallFidelity:
        """Over the adapters whose error is known (zeros for none)."""
        known = {name: entry for name, entry in per_adapter.items() if entry.has_error}
        if not known:
            return cls(mean_error=0.0, worst_adapter=None, worst_error=0.0, max_module_error=0.0)
        worst = max(known, key=lambda name: known[name].mean_error)
        maxima = [e.max_error for e in known.values() if _finite(e.max_error)]
        return cls(
            mean_error=sum(e.mean_error for e in known.values()) / len(known),
            worst_adapter=worst,
            worst_error=known[worst].mean_error,
            max_module_error=max(maxima, default=0.0),
        )

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OverallFidelity:
        if not isinstance(data, dict):
            raise BundleFormatError(f"{where} must be an object, got {type(data).__name__}.")
        return cls(
            mean_error=_read(data, "mean_error", "number", where),
            worst_adapter=_read(data, "worst_adapter", "string", where),
            worst_error=_read(data, "worst_error", "number", where),
            max_module_error=_read(data, "max_module_error", "number", where),
        )


@dataclass
class BundleSize:
    """Stored elements ("params") and bytes of the source adapters and of the bundle, in the bundle's storage dtype;
    `ratio` = original / bundle parameters (above 1: the bundle is smaller)."""

    params_original: Optional[int] = None
    params_bundle: Optional[int] = None
    bytes_original: Optional[int] = None
    bytes_bundle: Optional[int] = None
    dtype: Optional[str] = None

    @classmethod
    def of(cls, params_original: int, bytes_original: int, params_bundle: int, itemsize: int, dtype: str) -> BundleSize:
        return cls(int(params_original), int(params_bundle), int(bytes_original), int(params_bundle * itemsize), dtype)

    @property
    def ratio(self) -> Optional[float]:
        if self.params_original is None or self.params_bundle is None:
            return None
        return self.params_original / self.params_bundle if self.params_bundle else math.inf

    def to_dict(self) -> dict[str, Any]:
        """{"params": {"original", "bundle", "ratio"}, "bytes": {"original", "bundle", "dtype"}}, as far as known."""
        out: dict[str, Any] = {}
        if self.params_original is not None or self.params_bundle is not None:
            out["params"] = {"original": self.params_original, "bundle": self.params_bundle, "ratio": self.ratio}
        if self.bytes_original is not None or self.bytes_bundle is not None:
            out["bytes"] = {"original": self.bytes_original, "bundle": self.bytes_bundle, "dtype": self.dtype}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> BundleSize:
        params = _read(data, "params", "object", where) or {}
        size = _read(data, "bytes", "object", where) or {}
        return cls(
            params_original=_read(params, "original", "integer", f"{where}, params"),
            params_bundle=_read(params, "bundle", "integer", f"{where}, params"),
            bytes_original=_read(size, "original", "integer", f"{where}, bytes"),
            bytes_bundle=_read(size, "bundle", "integer", f"{where}, bytes"),
            dtype=_read(size, "dtype", "string", f"{where}, bytes"),
        )


# ------------------------------------------------------------------------------------------------ the report

# Top-level fields of the report and how they are checked on reading (the parts above have their own).
_SCALARS = {
    "method": "string",  # "jd-full", "jd-diag", "svd" or "budget"
    "rank": "integer",
    "sigma_type": "string",
    "num_clusters": "integer",
    "num_adapters": "integer",
    "num_modules": "integer",
    "seconds": "number",
    "device": "string",
    "world_size": "integer",
    "compute_dtype": "string",
    "seed": "integer",
    "tol": "number",
    "stall_tol": "number",
    "max_iter": "integer",
    "clusters_requested": "cluster",
    "target_error": "number",
    "max_share": "number",
}
_SECTIONS = {
    "iterations": "object",  # the fixed shapes' fit: cluster passes, JD-Full / JD-Diag iterations
    "cluster_search": "list",  # clusters="auto": every count tried with its mean error
    "svd_baseline": "object",  # per-adapter SVD near the bundle's size (`svd.svd_baseline`)
    "budget": "object",  # a budget plan: what was asked, spent, predicted, the baselines (`plan_io.budget_report`)
    "plan": "object",  # a budget plan per module (`plan_io.plan_report`)
    "timings": "object",  # a budget plan's steps, in seconds
    "verification": "object",  # the jdlora tools' checks before writing (`jdlora_hub.verify`)
    "training": "object",  # `jdlora train`: {adapter: the run's record}
}
_NAME_LISTS = ("projected", "removed", "trained_in_basis")


@dataclass
class BundleReport:
    """The fidelity report of a bundle: how it was made (`method`, shape, the settings and the run), each adapter's
    errors (`per_adapter`), the bundle's (`overall`), its size against the source adapters (`size`), and the
    sections of its method (see `_SECTIONS`); adapters `projected`, `removed` and `trained_in_basis` since."""

    method: Optional[str] = None
    rank: Optional[int] = None
    sigma_type: Optional[str] = None
    num_clusters: Optional[int] = None
    num_adapters: Optional[int] = None
    num_modules: Optional[int] = None
    per_adapter: dict[str, AdapterReport] = field(default_factory=dict)
    overall: OverallFidelity = field(default_factory=OverallFidelity)
    size: BundleSize = field(default_factory=BundleSize)
    seconds: Optional[float] = None
    device: Optional[str] = None
    world_size: Optional[int] = None
    compute_dtype: Optional[str] = None
    seed: Optional[int] = None
    tol: Optional[float] = None
    stall_tol: Optional[float] = None
    max_iter: Optional[int] = None
    clusters_requested: Union[int, str, None] = None
    target_error: Optional[float] = None
    max_share: Optional[float] = None
    iterations: Optional[dict[str, Any]] = None
    cluster_search: Optional[list[dict[str, Any]]] = None
    svd_baseline: Optional[dict[str, Any]] = None
    budget: Optional[dict[str, Any]] = None
    plan: Optional[dict[str, dict[str, Any]]] = None
    timings: Optional[dict[str, Any]] = None
    verification: Optional[dict[str, Any]] = None
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    projected: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    trained_in_basis: list[str] = field(default_factory=list)
    version: int = REPORT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        raise TypeError(
            f"a bundle's report is a BundleReport, not a dict: read its fields (report.overall.mean_error, "
            f"report.per_adapter[name].mean_error, report.size, ...), or report.to_dict()[{key!r}] for the JSON."
        )

    # ---------------------------------------------------------------- updates

    def refresh_overall(self) -> None:
        """The overall numbers again, from `per_adapter`."""
        self.overall = OverallFidelity.of(self.per_adapter)

    def add_adapters(self, entries: Mapping[str, AdapterReport], *, num_adapters: int, num_clusters: int) -> None:
        """Adapters added to the bundle (projected, or trained in its basis): their entries, the counts, the overall
        numbers."""
        self.per_adapter.update(entries)
        self.num_adapters, self.num_clusters = num_adapters, num_clusters
        self.refresh_overall()

    def drop_adapters(self, names: Sequence[str], clusters: Mapping[str, int], *, num_clusters: int) -> None:
        """Adapters removed from the bundle: the others keep their entries with their new cluster ids (`clusters`),
        `removed` lists the names, and `projected` / `trained_in_basis` no longer do."""
        dropped = set(names)
        self.per_adapter = {
            name: dataclasses.replace(entry, cluster=clusters[name])
            for name, entry in self.per_adapter.items()
            if name not in dropped and name in clusters
        }
        self.num_adapters, self.num_clusters = len(clusters), num_clusters
        self.removed = [*self.removed, *names]
        self.projected = [n for n in self.projected if n not in dropped]
        self.trained_in_basis = [n for n in self.trained_in_basis if n not in dropped]
        self.refresh_overall()

    def refresh_size(
        self, params_bundle: int, itemsize: int, dtype: str, original_added: int = 0, original_removed: int = 0
    ) -> None:
        """The sizes after adapters were added or removed: the bundle's from its stored elements, the originals'
        parameters summed over `per_adapter`, their bytes moved by the bytes of the adapters added or removed (or, for
        a report without them, counted in the storage dtype)."""
        params_original = sum(int(entry.params or 0) for entry in self.per_adapter.values())
        if self.size.bytes_original is None:
            bytes_original = params_original * itemsize
        else:
            bytes_original = self.size.bytes_original + original_added - original_removed
        self.size = BundleSize.of(params_original, bytes_original, params_bundle, itemsize, dtype)

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values: unknown keys as read, then every field that is set."""
        out: dict[str, Any] = dict(self.extra)
        out["report_version"] = self.version
        out.update(_without_none({name: getattr(self, name) for name in _SCALARS}))
        out["per_adapter"] = {name: entry.to_dict() for name, entry in self.per_adapter.items()}
        if not self.overall.is_empty():
            out["overall"] = self.overall.to_dict()
        out.update(self.size.to_dict())
        out.update(_without_none({name: getattr(self, name) for name in _SECTIONS}))
        if not self.training:
            out.pop("training", None)
        for name in _NAME_LISTS:
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        return json.loads(json.dumps(out, default=str))  # tuples as lists, anything else as text

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "the report") -> BundleReport:
        """A report from its JSON (any version: see the module docstring); `BundleFormatError` naming the field at
        fault."""
        if not isinstance(data, dict):
            raise BundleFormatError(f"{where} must be a JSON object, got {type(data).__name__}.")
        version = data.get("report_version", 0)
        if not _integer(version) or version < 0:
            raise BundleFormatError(f"{where}: field 'report_version' must be a non-negative integer, got {version!r}.")
        per_adapter = _read(data, "per_adapter", "object", where) or {}
        overall = _read(data, "overall", "object", where)
        lists = {}
        for name in _NAME_LISTS:
            values = _read(data, name, "list", where) or []
            if not all(isinstance(v, str) for v in values):
                raise BundleFormatError(f"{where}: field {name!r} must be a list of adapter names.")
            lists[name] = list(values)
        known = {"report_version", "per_adapter", "overall", "params", "bytes", *_SCALARS, *_SECTIONS, *_NAME_LISTS}
        return cls(
            per_adapter={
                name: AdapterReport.from_dict(entry, f"{where}: per_adapter[{name!r}]")
                for name, entry in per_adapter.items()
            },
            overall=OverallFidelity() if overall is None else OverallFidelity.from_dict(overall, f"{where}: overall"),
            size=BundleSize.from_dict(data, where),
            **{name: _read(data, name, kind, where) for name, kind in _SCALARS.items()},
            **{name: _read(data, name, kind, where) for name, kind in _SECTIONS.items() if name != "training"},
            training=_read(data, "training", "object", where) or {},
            **lists,
            version=version,
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def coerce(cls, report: Union[BundleReport, Mapping[str, Any], None], where: str = "the report") -> BundleReport:
        """`report` as a `BundleReport` (a dict is read with `from_dict`; None is an empty report)."""
        if report is None:
            return cls()
        if isinstance(report, BundleReport):
            return report
        return cls.from_dict(dict(report), where)


__all__ = ["REPORT_NAME", "REPORT_VERSION", "AdapterReport", "BundleReport", "BundleSize", "OverallFidelity"]
