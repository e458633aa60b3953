"""Reading PEFT LoRA adapter folders into plain factors, and checking that a collection can share one bundle.

Every update is returned as `ΔW = B @ A` in `[d_out, d_in]` layout with the LoRA scaling folded into B:

    scaling = lora_alpha / r            (or lora_alpha / sqrt(r) with use_rslora)
    r, lora_alpha per module from rank_pattern / alpha_pattern, matched as PEFT matches them

PEFT stores `lora_A.weight` as `[r, in_features]` and `lora_B.weight` as `[out_features, r]` also for GPT-2's
`Conv1D` (fan_in_fan_out only transposes ΔW when it is merged), so no transpose is needed here.

What a JD-LoRA bundle cannot represent is refused with an `AdapterReadError` naming the folder, the module or the
tensor at fault, never dropped silently: DoRA and other LoRA variants that change the forward, LoRA biases and trained
base biases, `modules_to_save`, embedding / convolution / parameter targets, trainable tokens, and initialisations
that modify the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..bundle import CONFIG_NAME, FLOAT_DTYPES, KEY_PREFIX, read_json_object
from ..bundle import PICKLED_WEIGHTS_NAME as BIN_NAME
from ..bundle import WEIGHTS_NAME as SAFETENSORS_NAME
from ..config import pattern_key  # PEFT's rule, as the bundle config applies it

# `lora_A.weight`, `lora_B.weight`, optionally with the adapter name PEFT strips on save (`lora_A.default.weight`).
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# Initialisations after which the adapter only works on a base model whose weights were modified as well.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoRA variants (fields PEFT marks `is_lora_variant`) whose forward is plain `x + s·B·A·x`: accepted.
_FORWARD_IDENTICAL_VARIANTS = frozenset({"velora_config"})
# Config fields whose (true) value means the adapter is not `x + s·B·A·x` on Linear layers, and why ({value}: the
# field's value).
_REFUSED_FIELDS = {
    "use_qalora": "QALoRA adapters (use_qalora=true) pool the input; cannot be represented.",
    "lora_bias": "the adapter trains a bias on lora_B (lora_bias=true); a JD-LoRA bundle holds no biases.",
    "modules_to_save": "the adapter fully trains modules_to_save={value!r}; a JD-LoRA bundle holds only low-rank "
    "updates. Remove them (or serve them separately) before compressing.",
    "trainable_token_indices": "the adapter trains embedding tokens (trainable_token_indices); cannot be represented.",
    "target_parameters": "the adapter targets parameters ({value!r}), not Linear modules; only Linear / Conv1D targets "
    "can be compressed.",
    "layer_replication": "the adapter replicates base layers (layer_replication); cannot be represented.",
}
_KNOWN_VARIANTS = (
    "use_dora",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)


class AdapterReadError(ValueError):
    """A source adapter cannot be read or cannot be represented in a JD-LoRA bundle.

    The message names the folder, module or adapter at fault and says why.
    """


@dataclass
class LoraAdapter:
    """One LoRA adapter as plain factors.

    Args:
        name: the adapter's name in the bundle.
        modules: module path (relative to the transformers model, e.g. `model.layers.0.self_attn.q_proj`) ->
            `(A [r_i, d_in], B [d_out, r_i])` with the LoRA scaling folded into B, so that `ΔW = B @ A`
            `[d_out, d_in]`. May be a lazy mapping that reads the tensors from disk on access (see
            `read_lora_adapter(lazy=True)`).
        base_model: `base_model_name_or_path` of the adapter's config.
        source: provenance (`{"source": path or Hub id, "revision": sha or None, "r": ..., "lora_alpha": ..., ...}`).
        fan_in_fan_out: True if the adapted layers store weights as (fan_in, fan_out), like GPT-2's `Conv1D`.
        task_type: PEFT task type of the adapter.
        dtype: dtype the adapter's tensors were stored in (the default storage dtype of a bundle made from it).
    """

    name: str
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    base_model: Optional[str] = None
    source: dict[str, Any] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    task_type: Optional[str] = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise AdapterReadError(f"adapter names must be non-empty strings, got {self.name!r}.")
        if not self.modules:
            raise AdapterReadError(f"adapter {self.name!r} has no LoRA modules.")
        if isinstance(self.modules, _LazyModules):
            return
        for module, factors in self.modules.items():
            _check_factor_shapes(factors, f"adapter {self.name!r}, module {module!r}")

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """{module: (d_out, d_in, rank)} without reading tensors of a lazy adapter."""
        if isinstance(self.modules, _LazyModules):
            return dict(self.modules.shapes)
        return {m: (b.shape[0], a.shape[1], a.shape[0]) for m, (a, b) in self.modules.items()}

    @property
    def num_params(self) -> int:
        """Stored LoRA parameters: Σ_modules r_i·(d_in + d_out)."""
        return sum(r * (d_out + d_in) for d_out, d_in, r in self.shapes().values())

    def delta_weight(self, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ΔW [d_out, d_in] of one module (for tests and small checks only)."""
        a, b = self.modules[module]
        return b.to(dtype) @ a.to(dtype)


def _check_factor_shapes(factors: Any, where: str) -> None:
    if not (isinstance(factors, (tuple, list)) and len(factors) == 2):
        raise AdapterReadError(f"{where}: expected a pair (A [r, d_in], B [d_out, r]), got {type(factors).__name__}.")
    a, b = factors
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != 2 or b.dim() != 2:
        raise AdapterReadError(f"{where}: A and B must be 2-D tensors (A [r, d_in], B [d_out, r]).")
    if a.shape[0] != b.shape[1]:
        raise AdapterReadError(
            f"{where}: A has shape {tuple(a.shape)} and B {tuple(b.shape)}; expected A [r, d_in] and B [d_out, r]."
        )


# ------------------------------------------------------------------------------------------------ pattern matching


def lora_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float, float]:
    """(r, lora_alpha, scaling) PEFT uses for `module` of an adapter with this `adapter_config.json` content."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(list(rank_pattern), module), pattern_key(list(alpha_pattern), module)
    r = int(rank_pattern[r_key]) if r_key is not None else int(config.get("r", 8))
    alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else float(config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, alpha, scaling


# ------------------------------------------------------------------------------------------------ reading


class _LazyModules(Mapping):
    """Module -> (A, B·scaling) read from a safetensors file on access, so that a collection of many large adapters
    is never held in memory at once (the engine loads one batch of modules at a time)."""

    def __init__(self, path: Path, keys: dict[str, tuple[str, str]], scaling: dict[str, float], dtype: torch.dtype):
        self.path = path
        self.keys = keys  # module -> (key of lora_A, key of lora_B)
        self.scaling = scaling
        self.compute_dtype = dtype
        self.shapes: dict[str, tuple[int, int, int]] = {}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for module, (key_a, key_b) in keys.items():
                r, d_in = f.get_slice(key_a).get_shape()
                d_out, _ = f.get_slice(key_b).get_shape()
                self.shapes[module] = (d_out, d_in, r)

    def __getitem__(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load_many([module])[module]

    def load_many(self, modules: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Several modules with one opening of the file (the engine reads a batch of modules per adapter)."""
        from safetensors import safe_open

        out = {}
        with safe_open(str(self.path), framework="pt") as f:
            for module in modules:
                key_a, key_b = self.keys[module]
                a, b = f.get_tensor(key_a), f.get_tensor(key_b)
                out[module] = (a.to(self.compute_dtype), b.to(self.compute_dtype) * self.scaling[module])
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _load_config(folder: Path) -> dict[str, Any]:
    config_file = folder / CONFIG_NAME
    if not folder.is_dir():
        raise AdapterReadError(f"{folder} is not a folder: a PEFT LoRA adapter is a folder holding {CONFIG_NAME}.")
    if not config_file.is_file():
        raise AdapterReadError(f"{folder} holds no {CONFIG_NAME}: not a PEFT adapter folder.")
    return read_json_object(config_file, AdapterReadError, holds="config fields")


def _check_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse what the config alone says cannot be represented as `ΔW = s·B·A` on Linear layers."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterReadError(
            f"{where}: peft_type is {peft_type!r}; only plain LoRA adapters (peft_type 'LORA') can be compressed."
        )
    if config.get("use_dora"):
        raise AdapterReadError(
            f"{where}: DoRA adapters (use_dora=true) rescale the weight by a learned magnitude vector, which a shared "
            "basis cannot represent; DoRA adapters cannot be compressed."
        )
    for name in _lora_variant_fields():
        if name not in _FORWARD_IDENTICAL_VARIANTS and config.get(name):
            raise AdapterReadError(
                f"{where}: the adapter uses the LoRA variant {name}={config[name]!r}, whose forward is not "
                "x + s·B·A·x; it cannot be represented in a JD-LoRA bundle."
            )
    for name, reason in _REFUSED_FIELDS.items():
        if config.get(name):
            raise AdapterReadError(f"{where}: " + reason.format(value=config[name]))
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise AdapterReadError(
            f"{where}: init_lora_weights={init!r} modifies the base weights as well, so the adapter only works on that "
            "modified base model. Convert it to a plain LoRA first (PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...)) and compress the converted adapter."
        )


def _lora_variant_fields() -> tuple[str, ...]:
    """Fields of PEFT's LoraConfig that switch on a LoRA variant (PEFT marks them `is_lora_variant`)."""
    try:
        from peft import LoraConfig

        found = tuple(f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant"))
    except Exception:  # a PEFT without the marker: fall back to the variants we know
        found = ()
    return tuple(dict.fromkeys(found + _KNOWN_VARIANTS))


def _classify_keys(keys: Sequence[str], where: str) -> dict[str, dict[str, str]]:
    """{module: {"A": key, "B": key}} of the LoRA factors; refuse every other tensor with the reason."""
    factors: dict[str, dict[str, str]] = {}
    # The specific reasons first (over all keys), so that e.g. an embedding LoRA is reported as such rather than as
    # the copy of the embedding weights PEFT saves beside it.
    for key in keys:
        bare = key.removeprefix(KEY_PREFIX)
        if "lora_magnitude_vector" in bare:
            raise AdapterReadError(f"{where}: tensor {key!r} is a DoRA magnitude vector; DoRA cannot be compressed.")
        if "lora_embedding_A" in bare or "lora_embedding_B" in bare:
            raise AdapterReadError(
                f"{where}: tensor {key!r} is a LoRA on an embedding layer; only Linear / Conv1D targets can be "
                "compressed."
            )
        if re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", bare):
            raise AdapterReadError(
                f"{where}: tensor {key!r} is a LoRA bias (lora_bias); a JD-LoRA bundle holds no biases."
            )
    for key in keys:
        bare = key.removeprefix(KEY_PREFIX)
        match = _FACTOR_KEY.match(bare)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = key
            continue
        if bare.endswith(".bias"):
            raise AdapterReadError(
                f"{where}: tensor {key!r} is a trained bias (LoraConfig bias='all' or 'lora_only'); a JD-LoRA bundle "
                "holds no biases."
            )
        raise AdapterReadError(
            f"{where}: tensor {key!r} is not a LoRA factor (modules_to_save, trained base weights or an unsupported "
            "adapter type); a JD-LoRA bundle cannot represent it."
        )
    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise AdapterReadError(f"{where}: module {module!r} has no {missing} weight.")
    if not factors:
        raise AdapterReadError(f"{where}: the weights file holds no LoRA factors.")
    return factors


def read_lora_adapter(
    folder: Union[str, os.PathLike],
    name: Optional[str] = None,
    source: Optional[dict[str, Any]] = None,
    *,
    lazy: bool = False,
) -> LoraAdapter:
    """Read a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`, or `adapter_model.bin` loaded
    with `torch.load(weights_only=True)`).

    Args:
        folder: the adapter folder.
        name: the adapter's name in a bundle (default: the folder's name).
        source: provenance to record (e.g. `{"source": "org/repo", "revision": sha}`); merged over the defaults.
        lazy: with a safetensors file, read tensors only when a module is accessed (keeps memory flat for big
            collections). Otherwise all tensors are loaded now.

    Raises:
        AdapterReadError: the folder is not a readable LoRA adapter, or holds something a bundle cannot represent.
    """
    folder = Path(folder)
    where = str(folder)
    config = _load_config(folder)
    _check_config(config, where)
    safetensors_file, bin_file = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if safetensors_file.is_file():
        weights_file = safetensors_file
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights_file), framework="pt") as f:
                keys = list(f.keys())
                stored = {k: f.get_slice(k).get_dtype() for k in keys}
        except (SafetensorError, OSError) as err:
            raise AdapterReadError(f"{weights_file} cannot be read: {err}") from None
        tensors = None
    elif bin_file.is_file():
        weights_file = bin_file
        try:
            # weights_only=True: a .bin is a pickle, and only plain tensors may be unpickled from a downloaded file.
            tensors = torch.load(str(weights_file), map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterReadError(f"{weights_file} cannot be read with torch.load(weights_only=True): {err}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterReadError(f"{weights_file} does not hold a flat state dict of tensors.")
        keys = list(tensors)
        lazy = False
    else:
        raise AdapterReadError(f"{folder} holds neither {SAFETENSORS_NAME} nor {BIN_NAME}.")
    where = str(weights_file)
    factor_keys = _classify_keys(keys, where)

    modules_shapes: dict[str, tuple[int, int, int]] = {}
    scaling: dict[str, float] = {}
    eager: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dtypes = set()
    if tensors is None and not lazy:
        from safetensors.torch import load_file

        tensors = load_file(str(weights_file))
    for module, parts in sorted(factor_keys.items()):
        if tensors is not None:
            a, b = tensors[parts["A"]], tensors[parts["B"]]
            a_shape, b_shape, dtype = tuple(a.shape), tuple(b.shape), a.dtype
        else:
            from safetensors import safe_open

            with safe_open(str(weights_file), framework="pt") as f:
                a_shape, b_shape = (
                    tuple(f.get_slice(parts["A"]).get_shape()),
                    tuple(f.get_slice(parts["B"]).get_shape()),
                )
            dtype = _safetensors_dtype(stored[parts["A"]])
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterReadError(
                f"{where}: module {module!r} has lora_A of shape {a_shape} and lora_B of shape {b_shape}: a LoRA on "
                "a convolution or another non-Linear layer; only Linear / Conv1D targets can be compressed."
            )
        r_expected, _, s = lora_scaling(config, module)
        if a_shape[0] != b_shape[1] or a_shape[0] != r_expected:
            raise AdapterReadError(
                f"{where}: module {module!r} has lora_A {a_shape} and lora_B {b_shape}, but the config's "
                f"r / rank_pattern give rank {r_expected} for it; the config does not match the weights."
            )
        modules_shapes[module] = (b_shape[0], a_shape[1], a_shape[0])
        scaling[module] = s
        dtypes.add(dtype)
        if tensors is not None:
            compute = torch.float64 if a.dtype == torch.float64 else torch.float32
            a, b = a.to(compute), b.to(compute) * s
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterReadError(f"{where}: module {module!r} holds NaN or inf values.")
            eager[module] = (a, b)
    stored_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

    info = {
        "source": str(folder),
        "revision": None,
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora", False)),
        "rank_pattern": dict(config.get("rank_pattern") or {}),
        "alpha_pattern": dict(config.get("alpha_pattern") or {}),
        "target_modules": config.get("target_modules"),
        "base_model": config.get("base_model_name_or_path"),
        "dtype": str(stored_dtype).removeprefix("torch."),
        "format": weights_file.suffix.lstrip("."),
    }
    if isinstance(info["target_modules"], (set, tuple)):
        info["target_modules"] = sorted(info["target_modules"])
    info.update(source or {})
    if lazy:
        compute = torch.float64 if stored_dtype == torch.float64 else torch.float32
        modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = _LazyModules(
            weights_file, {m: (p["A"], p["B"]) for m, p in factor_keys.items()}, scaling, compute
        )
    else:
        modules = eager
    return LoraAdapter(
        name=name if name is not None else folder.resolve().name,
        modules=modules,
        base_model=config.get("base_model_name_or_path"),
        source=info,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        task_type=config.get("task_type"),
        dtype=stored_dtype,
    )


def _safetensors_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("F32", or "float32" from older safetensors); float32 for dtypes a
    LoRA is not stored in."""
    dtype = FLOAT_DTYPES.get(str(name)) or getattr(torch, str(name), None)
    return dtype if dtype in FLOAT_DTYPES.values() else torch.float32


def as_adapters(adapters: Sequence[Union[LoraAdapter, str, os.PathLike]], lazy: bool = True) -> list[LoraAdapter]:
    """LoraAdapter objects for a mix of adapters and folders (folders are read lazily by default)."""
    if isinstance(adapters, (str, os.PathLike, LoraAdapter)):
        raise TypeError("pass a sequence of adapters or folders, not a single one.")
    out = []
    for item in adapters:
        if isinstance(item, LoraAdapter):
            out.append(item)
        elif isinstance(item, (str, os.PathLike)):
            out.append(read_lora_adapter(item, lazy=lazy))
        else:
            raise TypeError(f"expected a LoraAdapter or a folder path, got {type(item).__name__}.")
    return out


def check_collection(adapters: Sequence[LoraAdapter], check_base_model: bool = True) -> dict[str, tuple[int, int]]:
    """Check that the adapters can share one bundle; return {module: (d_out, d_in)} of the union of their modules.

    Raises `AdapterReadError` on repeated names, different base models or fan_in_fan_out, or a module whose shape
    differs between adapters (naming both adapters).
    """
    if not adapters:
        raise ValueError("no adapters given.")
    seen: dict[str, int] = {}
    for i, adapter in enumerate(adapters):
        if adapter.name in seen:
            raise AdapterReadError(
                f"two adapters are named {adapter.name!r} (positions {seen[adapter.name]} and {i}); names must be "
                "unique in a bundle."
            )
        seen[adapter.name] = i
    if check_base_model:
        bases = {a.base_model for a in adapters if a.base_model}
        if len(bases) > 1:
            by_base = {b: [a.name for a in adapters if a.base_model == b][:3] for b in sorted(bases)}
            raise AdapterReadError(
                f"the adapters were trained on different base models: {by_base}. A bundle serves one base model "
                "(pass check_base_model=False if these names denote the same weights)."
            )
    fan = {a.fan_in_fan_out for a in adapters}
    if len(fan) > 1:
        raise AdapterReadError(
            "some adapters have fan_in_fan_out=True and others False: they were made for different layer types."
        )
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for adapter in adapters:
        for module, (d_out, d_in, _) in adapter.shapes().items():
            if module not in shapes:
                shapes[module], owner[module] = (d_out, d_in), adapter.name
            elif shapes[module] != (d_out, d_in):
                raise AdapterReadError(
                    f"module {module!r} is {shapes[module][0]}x{shapes[module][1]} (d_out x d_in) in adapter "
                    f"{owner[module]!r} but {d_out}x{d_in} in adapter {adapter.name!r}: different base models."
                )
    return dict(sorted(shapes.items()))
