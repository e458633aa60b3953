"""`JDLoraConfig`: the facts of a JD-LoRA bundle, stored as the bundle's `adapter_config.json`."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .peft_type import JDLORA

FORMAT_VERSION = 1
SIGMA_TYPES = ("full", "diag")
# PEFT's model classes for these task types train and save a new head (`modules_to_save`): a bundle has no place
# for one shared by all its adapters, and the rows of a mixed batch would all go through it, base rows included.
REFUSED_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


class BundleFormatError(ValueError):
    """A bundle's config or tensors do not describe a valid JD-LoRA bundle."""


def pattern_key(pattern_keys: Iterable[str], module_name: str) -> Optional[str]:
    """The key of a per-module pattern that applies to `module_name`, matched as PEFT's `get_pattern_key` matches a
    LoRA's `rank_pattern` / `alpha_pattern`: the first key that, read as a regex, matches a dot-separated tail of the
    module path (`q_proj`, `layers\\.[0-3]\\.self_attn\\.q_proj`, the full path). None when no key applies."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


# field -> (check, what it must be): every field is checked before its value is used.
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "target_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a list of strings or a regex"),
    "r": (_is_int, "an integer"),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(r) for k, r in v.items()),
        "a mapping {module: rank} of integers",
    ),
    "sigma_type": (lambda v: isinstance(v, str), "a string"),
    "sigma_pattern": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, str) for k, t in v.items()),
        "a mapping {module: 'full' | 'diag'}",
    ),
    "num_clusters": (_is_int, "an integer"),
    "adapter_names": (_is_str_list, "a list of strings"),
    "adapter_clusters": (lambda v: v is None or _is_int_list(v), "a list of integers or null"),
    "cluster_pattern": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int_list(a) for k, a in v.items()),
        "a mapping {module: [cluster of each adapter]}",
    ),
    "adapter_sources": (lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v), "a list of objects"),
    "default_adapter": (lambda v: v is None or isinstance(v, str) or _is_int(v), "an adapter name, index or null"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or _is_int_list(v), "an integer or list of integers"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a string or list of strings"),
    "init_weights": (lambda v: isinstance(v, bool) or v == "zeros", "true, false or 'zeros'"),
    "base_model_type": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "a string or null"),
}


@dataclass
class JDLoraConfig(PeftConfig):
    """
    Configuration of a JD-LoRA bundle: N LoRA adapters compressed jointly into a shared basis per target module.

    For every target module and adapter i of cluster c, the weight update is `ΔW_i = U_c · Σ_i · V_cᵀ` with
    `U_c: d_out×r`, `V_c: d_in×r` shared by the adapters of cluster c, and `Σ_i: r×r` (`sigma_type="full"`) or a
    diagonal of r numbers (`sigma_type="diag"`) private to adapter i. Σ_i carries the adapter's LoRA scaling.

    Args:
        target_modules: module names (or suffixes, or a regex) the bundle patches, as in `LoraConfig`.
        r: rank of the shared basis for modules not listed in `rank_pattern` (any r works, as in LoRA: a rank above
            a layer's dimension gives a basis with orthonormal rows instead of columns).
        rank_pattern: per-module rank overrides, `{module_name: r}`; keys are matched as in `LoraConfig` (a regex
            matching a dot-separated tail of the module path, see `pattern_key`), and a key that is the module's
            full path wins over broader ones.
        sigma_type: `"full"` (Σ_i is r×r) or `"diag"` (Σ_i is a vector of r numbers).
        sigma_pattern: per-module Σ type overrides, `{module_name: "full" | "diag"}` (budget plans mix them: a
            module stored as per-adapter SVD is a singleton cluster per adapter with a diagonal Σ).
        num_clusters: number of shared bases per module for modules not listed in `cluster_pattern`.
        adapter_names: names of the N adapters, in bundle order (index i of Σ).
        adapter_clusters: cluster of each adapter (length N, values in [0, num_clusters)).
        cluster_pattern: per-module cluster assignment overrides, `{module_name: [cluster of each adapter]}`.
            The keys of sigma_pattern and cluster_pattern are matched as those of rank_pattern.
        adapter_sources: provenance of each source adapter (`{"source": path or Hub id, "revision": sha, ...}`).
        default_adapter: adapter (name or index) used for rows without an explicit id; None means the base model.
        fan_in_fan_out: True if the patched layers store weights as (fan_in, fan_out), like GPT-2's `Conv1D`.
        init_weights: how fresh factors start, as in PEFT: True, a random orthonormal basis with Σ = 0 (the model
            is unchanged until Σ is trained); False, a random basis and a random Σ (a non-identity adapter, for
            tests); "zeros", all zeros (what loading a bundle uses, since the values are replaced right after).
        base_model_type: `model_type` of the base model's config (e.g. "llama"), checked when the bundle is loaded
            onto a model; recorded when a bundle is written or created on a model. None (older bundles): not checked.
        format_version: bundle format version; checked when the bundle is loaded.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names, suffixes or a regex of the modules the bundle patches (as in LoraConfig)."},
    )
    r: int = field(default=16, metadata={"help": "Rank of the shared basis (default for every module)."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module rank overrides: {module path, suffix or regex (as in LoraConfig): rank}."},
    )
    sigma_type: Literal["full", "diag"] = field(
        default="full", metadata={"help": "'full': Σ_i is r×r per adapter; 'diag': Σ_i is a vector of r numbers."}
    )
    sigma_pattern: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Per-module Σ type overrides: {module path, suffix or regex: 'full' | 'diag'}."},
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
        metadata={
            "help": "Per-module cluster assignment overrides: {module path, suffix or regex: [cluster per adapter]}."
        },
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
    init_weights: Union[bool, Literal["zeros"]] = field(
        default=True,
        metadata={
            "help": "True: a random orthonormal basis and Σ = 0 (the model is unchanged until Σ is trained); False: "
            "a random basis and random Σ (a non-identity adapter, as PEFT's init_weights=False); 'zeros': all zeros."
        },
    )
    base_model_type: Optional[str] = field(
        default=None,
        metadata={"help": "model_type of the base model the bundle was made for (e.g. 'llama'); checked on load."},
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Bundle format version, checked when a bundle is loaded."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = JDLORA
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)
        self.validate()
        if isinstance(self.target_modules, list):
            self.target_modules = sorted(self.target_modules)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None, **kwargs: Any
    ) -> PeftConfig:
        """Load a bundle's config (a folder or a Hub repo) and check it against the header of its weights file
        before anything is allocated: a config that lies about ranks, counts, dtypes or modules is refused here."""
        from .bundle import check_weights_header_of

        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except BundleFormatError as err:
            where = Path(pretrained_model_name_or_path, subfolder or "", "adapter_config.json")
            raise BundleFormatError(f"{where}: {err}") from None
        if isinstance(config, JDLoraConfig):
            hub_kwargs = cls._split_kwargs(kwargs)[0]
            # Runtime only (not a field, never saved): the tuner checks the base model against it before allocating.
            config._checked_shapes = check_weights_header_of(
                config, pretrained_model_name_or_path, subfolder, hub_kwargs
            )
            # Runtime only as well: where the bundle came from, so that training.py can carry its report and card over.
            config._loaded_from = (str(pretrained_model_name_or_path), subfolder, hub_kwargs.get("revision"))
        return config

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)

    def validate(self) -> None:
        """Raise `BundleFormatError` naming the field at fault if the config cannot describe a bundle."""
        if not _is_int(self.format_version):
            raise BundleFormatError(
                f"format_version must be an integer (this peft-jdlora reads bundle format {FORMAT_VERSION}), got "
                f"{type(self.format_version).__name__} {self.format_version!r}."
            )
        if self.format_version != FORMAT_VERSION:
            raise BundleFormatError(
                f"JD-LoRA bundle format version {self.format_version} is not supported by this peft-jdlora "
                f"(it reads version {FORMAT_VERSION}); upgrade peft-jdlora or re-convert the bundle."
            )
        for name, (check, expected) in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not check(value):
                raise BundleFormatError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.200}.")
        for name in ("rank_pattern", "sigma_pattern", "cluster_pattern"):
            for key in getattr(self, name):
                try:
                    re.compile(key)
                except re.error as err:
                    raise BundleFormatError(f"{name} key {key!r} is not a valid regular expression: {err}.") from None
        task_type = getattr(self.task_type, "value", self.task_type)
        if task_type in REFUSED_TASK_TYPES:
            raise BundleFormatError(
                f"task_type {task_type!r} is not supported by JD-LoRA: PEFT trains and saves a new head for it "
                "(modules_to_save), and a bundle serves its adapters through the patched Linear layers only. Use "
                "task_type 'CAUSAL_LM', 'SEQ_2_SEQ_LM', 'FEATURE_EXTRACTION' or None with the model's own head."
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
        if any(not name for name in self.adapter_names):
            raise BundleFormatError("adapter_names must be non-empty strings, got an empty name.")
        for i, name in enumerate(self.adapter_names):
            # NUL, escape sequences, newlines: no tool can print, route or export such a name faithfully.
            if any(unicodedata.category(ch) == "Cc" for ch in name):
                raise BundleFormatError(f"adapter_names[{i}] holds control characters: {name!r}.")
        self._check_assignment("adapter_clusters", self.adapter_clusters, self.num_clusters)
        for module, assignment in self.cluster_pattern.items():
            self._check_assignment(f"cluster_pattern[{module!r}]", assignment, None)
        if self.adapter_sources and len(self.adapter_sources) != self.num_adapters:
            raise BundleFormatError(
                f"adapter_sources has {len(self.adapter_sources)} entries for {self.num_adapters} adapters."
            )
        if self.default_adapter is not None:
            try:
                self.resolve_adapter(self.default_adapter)
            except (KeyError, IndexError) as err:
                raise BundleFormatError(f"default_adapter names no adapter of the bundle: {err.args[0]}") from None

    def _check_assignment(self, what: str, assignment: Optional[list[int]], num_clusters: Optional[int]) -> None:
        if assignment is None:
            return
        if len(assignment) != self.num_adapters:
            raise BundleFormatError(f"{what} has {len(assignment)} entries for {self.num_adapters} adapters.")
        bad = [c for c in assignment if c < 0 or (num_clusters and c >= num_clusters)]
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

    def pattern_key(self, pattern: dict[str, Any], module_name: str) -> Optional[str]:
        """The key of `pattern` (rank_pattern, sigma_pattern, cluster_pattern) that applies to `module_name`: the
        module's full path if it is a key, else PEFT's rule (`pattern_key`). The full path wins because PEFT's rule
        takes the first match in key order, and adapter_config.json stores keys sorted."""
        return module_name if module_name in pattern else pattern_key(pattern, module_name)

    def _pattern_value(self, pattern: dict[str, Any], module_name: str, default: Any) -> Any:
        key = self.pattern_key(pattern, module_name)
        return default if key is None else pattern[key]

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

    def factor_shapes(self, module_name: str, d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the module's tensors ({"jd_U", "jd_V", "jd_sigma"}) that the config implies for a d_out×d_in
        layer: U [C, d_out, r], V [C, r, d_in], Σ [N, r, r] or [N, r]."""
        r, c, n = self.rank_for(module_name), self.num_clusters_for(module_name), self.num_adapters
        sigma = (n, r, r) if self.sigma_for(module_name) == "full" else (n, r)
        return {"jd_U": (c, d_out, r), "jd_V": (c, r, d_in), "jd_sigma": sigma}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["peft_type"] = str(JDLORA.value)
        return data


def model_type_of(name_or_path: Union[str, os.PathLike, None]) -> Optional[str]:
    """`model_type` in a base model's config.json: a local folder, or a Hub id already in the local Hugging Face
    cache (never downloads). None when it cannot be found."""
    if not name_or_path:
        return None
    config_file: Optional[Path] = Path(name_or_path) / "config.json"
    if not config_file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(name_or_path), "config.json")
        except Exception:  # not a valid repo id, unreadable cache: nothing to record
            cached = None
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is None:
        return None
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None
