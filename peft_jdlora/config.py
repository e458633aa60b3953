"""`JDLoraConfig`: the facts of a JD-LoRA bundle, stored as the bundle's `adapter_config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .peft_type import JDLORA

FORMAT_VERSION = 1
SIGMA_TYPES = ("full", "diag")


class BundleFormatError(ValueError):
    """A bundle's config or tensors do not describe a valid JD-LoRA bundle."""


@dataclass
class JDLoraConfig(PeftConfig):
    """
    Configuration of a JD-LoRA bundle: N LoRA adapters compressed jointly into a shared basis per target module.

    For every target module and adapter i of cluster c, the weight update is `ΔW_i = U_c · Σ_i · V_cᵀ` with
    `U_c: d_out×r`, `V_c: d_in×r` shared by the adapters of cluster c, and `Σ_i: r×r` (`sigma_type="full"`) or a
    diagonal of r numbers (`sigma_type="diag"`) private to adapter i. Σ_i carries the adapter's LoRA scaling.

    Args:
        target_modules: module names (or suffixes, or a regex) the bundle patches, as in `LoraConfig`.
        r: rank of the shared basis for modules not listed in `rank_pattern`.
        rank_pattern: per-module rank overrides, `{module_name: r}`; keys are full module names or suffixes.
        sigma_type: `"full"` (Σ_i is r×r) or `"diag"` (Σ_i is a vector of r numbers).
        sigma_pattern: per-module Σ type overrides, `{module_name: "full" | "diag"}` (budget plans mix them: a
            module stored as per-adapter SVD is a singleton cluster per adapter with a diagonal Σ).
        num_clusters: number of shared bases per module for modules not listed in `cluster_pattern`.
        adapter_names: names of the N adapters, in bundle order (index i of Σ).
        adapter_clusters: cluster of each adapter (length N, values in [0, num_clusters)).
        cluster_pattern: per-module cluster assignment overrides, `{module_name: [cluster of each adapter]}`.
        adapter_sources: provenance of each source adapter (`{"source": path or Hub id, "revision": sha, ...}`).
        default_adapter: adapter (name or index) used for rows without an explicit id; None means the base model.
        fan_in_fan_out: True if the patched layers store weights as (fan_in, fan_out), like GPT-2's `Conv1D`.
        init_weights: initialise fresh factors with a random orthonormal basis (True) or zeros (False); Σ starts at 0.
        format_version: bundle format version; checked when the bundle is loaded.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names, suffixes or a regex of the modules the bundle patches (as in LoraConfig)."},
    )
    r: int = field(default=16, metadata={"help": "Rank of the shared basis (default for every module)."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module rank overrides: {module name or suffix: rank}."}
    )
    sigma_type: Literal["full", "diag"] = field(
        default="full", metadata={"help": "'full': Σ_i is r×r per adapter; 'diag': Σ_i is a vector of r numbers."}
    )
    sigma_pattern: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Per-module Σ type overrides: {module name or suffix: 'full' | 'diag'}."},
    )
    num_clusters: int = field(default=1, metadata={"help": "Shared bases (clusters) per module, by default."})
    adapter_names: list[str] = field(
        default_factory=list, metadata={"help": "Names of the adapters in the bundle, in bundle order."}
    )
    adapter_clusters: Optional[list[int]] = field(
        default=None, metadata={"help": "Cluster of each adapter (default: all in cluster 0)."}
    )
    cluster_pattern: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={"help": "Per-module cluster assignment overrides: {module name or suffix: [cluster per adapter]}."},
    )
    adapter_sources: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Provenance of each source adapter: path or Hub id, revision, original rank and alpha."},
    )
    default_adapter: Optional[Union[str, int]] = field(
        default=None,
        metadata={"help": "Adapter used for rows given no adapter id (name or index); None: the base model."},
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True if the patched layers store weight as (fan_in, fan_out) (GPT-2 Conv1D)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indexes to patch, as in LoraConfig."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, as in LoraConfig."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Start new factors from a random orthonormal basis and Σ = 0 (the model is unchanged until Σ is "
            "trained); False starts from zeros, which is faster when the values are loaded right after."
        },
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Bundle format version, checked when a bundle is loaded."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = JDLORA
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)

    def validate(self) -> None:
        """Raise `BundleFormatError` naming the field at fault if the config cannot describe a bundle."""
        if self.format_version != FORMAT_VERSION:
            raise BundleFormatError(
                f"JD-LoRA bundle format version {self.format_version} is not supported by this peft-jdlora "
                f"(it reads version {FORMAT_VERSION}); upgrade peft-jdlora or re-convert the bundle."
            )
        if self.sigma_type not in SIGMA_TYPES:
            raise BundleFormatError(f"sigma_type must be one of {SIGMA_TYPES}, got {self.sigma_type!r}.")
        bad_sigma = {m: t for m, t in self.sigma_pattern.items() if t not in SIGMA_TYPES}
        if bad_sigma:
            raise BundleFormatError(f"sigma_pattern values must be one of {SIGMA_TYPES}, got {bad_sigma}.")
        if self.r < 1 or any(r < 1 for r in self.rank_pattern.values()):
            raise BundleFormatError(f"ranks must be >= 1 (r={self.r}, rank_pattern={self.rank_pattern}).")
        if self.num_clusters < 1:
            raise BundleFormatError(f"num_clusters must be >= 1, got {self.num_clusters}.")
        if len(set(self.adapter_names)) != len(self.adapter_names):
            dupes = sorted({n for n in self.adapter_names if self.adapter_names.count(n) > 1})
            raise BundleFormatError(f"adapter_names must be unique; repeated: {dupes}.")
        for name in self.adapter_names:
            if not isinstance(name, str) or not name:
                raise BundleFormatError(f"adapter names must be non-empty strings, got {name!r}.")
        self._check_assignment("adapter_clusters", self.adapter_clusters, self.num_clusters)
        for module, assignment in self.cluster_pattern.items():
            self._check_assignment(f"cluster_pattern[{module!r}]", assignment, None)
        if self.adapter_sources and len(self.adapter_sources) != self.num_adapters:
            raise BundleFormatError(
                f"adapter_sources has {len(self.adapter_sources)} entries for {self.num_adapters} adapters."
            )
        if self.default_adapter is not None and self.num_adapters:
            self.resolve_adapter(self.default_adapter)

    def _check_assignment(self, what: str, assignment: Optional[list[int]], num_clusters: Optional[int]) -> None:
        if assignment is None:
            return
        if len(assignment) != self.num_adapters:
            raise BundleFormatError(f"{what} has {len(assignment)} entries for {self.num_adapters} adapters.")
        bad = [c for c in assignment if not isinstance(c, int) or c < 0 or (num_clusters and c >= num_clusters)]
        if bad:
            raise BundleFormatError(f"{what} holds invalid cluster ids {bad[:5]} (num_clusters={num_clusters}).")

    def resolve_adapter(self, adapter: Union[str, int, None]) -> int:
        """Index in the bundle of an adapter given by name or index; -1 for None / -1 (the base model)."""
        if adapter is None:
            return -1
        if isinstance(adapter, bool):
            raise TypeError(f"adapter ids are names, indices or None, got {adapter!r}.")
        if isinstance(adapter, int):
            if adapter == -1:
                return -1
            if not 0 <= adapter < self.num_adapters:
                raise IndexError(
                    f"adapter index {adapter} is out of range: the bundle has {self.num_adapters} adapters."
                )
            return adapter
        if isinstance(adapter, str):
            try:
                return self.adapter_names.index(adapter)
            except ValueError:
                close = [n for n in self.adapter_names if adapter.lower() in n.lower()][:5]
                hint = f" Similar names: {close}." if close else ""
                raise KeyError(
                    f"no adapter named {adapter!r} in this bundle ({self.num_adapters} adapters).{hint}"
                ) from None
        raise TypeError(f"adapter ids are names, indices or None, got {type(adapter).__name__} {adapter!r}.")

    def _pattern_value(self, pattern: dict[str, Any], module_name: str, default: Any) -> Any:
        if module_name in pattern:
            return pattern[module_name]
        for key, value in pattern.items():
            if module_name.endswith("." + key):
                return value
        return default

    def rank_for(self, module_name: str) -> int:
        return int(self._pattern_value(self.rank_pattern, module_name, self.r))

    def sigma_for(self, module_name: str) -> str:
        """Σ type ("full" or "diag") at `module_name`."""
        return str(self._pattern_value(self.sigma_pattern, module_name, self.sigma_type))

    def clusters_for(self, module_name: str) -> list[int]:
        """Cluster of each adapter at `module_name` (length N)."""
        default = self.adapter_clusters if self.adapter_clusters is not None else [0] * self.num_adapters
        return list(self._pattern_value(self.cluster_pattern, module_name, default))

    def num_clusters_for(self, module_name: str) -> int:
        if self._pattern_value(self.cluster_pattern, module_name, None) is None:
            return self.num_clusters
        return max(self.clusters_for(module_name), default=-1) + 1

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["peft_type"] = str(JDLORA.value)
        return data
