"""The bundle on disk: read, write and export JD-LoRA bundles without a base model.

A bundle folder is an ordinary PEFT adapter folder:

    adapter_config.json          JDLoraConfig (peft_type "JDLORA", format_version)
    adapter_model.safetensors    per target module M:
                                   base_model.model.M.jd_U      [C, d_out, r]
                                   base_model.model.M.jd_V      [C, r, d_in]
                                   base_model.model.M.jd_sigma  [N, r, r] or [N, r]
    jdlora_report.json           fidelity report of the compression (optional)
    README.md                    model card (optional)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import BundleFormatError, JDLoraConfig, model_type_of
from .report import REPORT_NAME, BundleReport

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # what PEFT's save_pretrained(safe_serialization=False) writes
CARD_NAME = "README.md"
BUNDLE_FILES = (CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME, CARD_NAME)  # a bundle folder's own files; nothing else is ours
KEY_PREFIX = "base_model.model."
FACTOR_NAMES = ("jd_U", "jd_V", "jd_sigma")
# safetensors dtype names of the floating-point dtypes a bundle may store.
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F32", ...), or its torch name for dtypes a bundle never holds."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_entries(
    config: JDLoraConfig, entries: dict[str, tuple[str, tuple[int, ...]]], where: str
) -> dict[str, tuple[int, int]]:
    """Check a bundle's tensors, given as {key: (dtype name, shape)}, against its config, before any value is read.

    Refuses tensors other than jd_U / jd_V / jd_sigma, non-float dtypes, tensors for modules `target_modules` does
    not name, modules lacking a factor, and shapes other than the config implies (so a config that lies about its
    rank or counts is caught here, by shapes alone). Returns {module: (d_out, d_in)}.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (dtype, shape) in entries.items():
        module, _, name = key.removeprefix(KEY_PREFIX).rpartition(".")
        if not key.startswith(KEY_PREFIX) or name not in FACTOR_NAMES or not module:
            raise BundleFormatError(
                f"{where}: unexpected tensor {key!r} (a JD-LoRA bundle holds {KEY_PREFIX}<module>.{{jd_U, jd_V, "
                "jd_sigma}} only)."
            )
        if dtype not in FLOAT_DTYPES:
            raise BundleFormatError(
                f"{where}: tensor {key!r} has dtype {dtype}; bundle tensors are floating point "
                f"({', '.join(FLOAT_DTYPES)})."
            )
        if config.target_modules is not None and not check_target_module_exists(config, module):
            raise BundleFormatError(
                f"{where}: tensor {key!r} is for module {module!r}, which the config's target_modules does not name."
            )
        grouped.setdefault(module, {})[name] = tuple(shape)
    if not grouped:
        raise BundleFormatError(f"{where}: the bundle holds no tensors.")
    dims = {}
    for module, parts in sorted(grouped.items()):
        missing = [n for n in FACTOR_NAMES if n not in parts]
        if missing:
            raise BundleFormatError(
                f"{where}: module {module!r} lacks tensors {missing} (no {KEY_PREFIX}{module}.{missing[0]}): the "
                "weights do not match the config."
            )
        if len(parts["jd_U"]) != 3 or len(parts["jd_V"]) != 3:
            raise BundleFormatError(
                f"{where}: module {module!r}: jd_U {parts['jd_U']} and jd_V {parts['jd_V']} must be 3-D "
                "([C, d_out, r] and [C, r, d_in])."
            )
        d_out, d_in = parts["jd_U"][1], parts["jd_V"][2]
        expected = config.factor_shapes(module, d_out, d_in)
        for name in FACTOR_NAMES:
            if parts[name] != expected[name]:
                raise BundleFormatError(
                    f"{where}: tensor {KEY_PREFIX}{module}.{name} has shape {parts[name]}, the config implies "
                    f"{expected[name]} (rank {config.rank_for(module)}, {config.num_clusters_for(module)} clusters, "
                    f"{config.num_adapters} adapters, sigma_type {config.sigma_for(module)})."
                )
        dims[module] = (d_out, d_in)
    return dims


def weights_header(weights_file: Union[str, os.PathLike]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype name, shape)} of a safetensors file, from its header alone (no tensor is read)."""
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise BundleFormatError(f"{weights_file} cannot be read: {err}") from None


def adapter_core(sigma: torch.Tensor, slot: int) -> torch.Tensor:
    """Σ of adapter `slot` as an r×r matrix, from a module's cores sigma [N, r, r] (full) or [N, r] (diagonal)."""
    return sigma[slot] if sigma.dim() == 3 else torch.diag(sigma[slot])


def adapter_delta_weight(
    U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor, slot: int, cluster: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense ΔW [d_out, d_in] = U[c] · Σ[slot] · V[c] of one adapter, computed in `dtype`.
    U: [C, d_out, r], V: [C, r, d_in], sigma: [N, r, r] or [N, r]."""
    return U[cluster].to(dtype) @ adapter_core(sigma, slot).to(dtype) @ V[cluster].to(dtype)


@dataclass
class ModuleFactors:
    """One module's factors. U: [C, d_out, r], V: [C, r, d_in], sigma: [N, r, r] or [N, r]."""

    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the patched weight."""
        return self.U.shape[1], self.V.shape[2]

    def delta_weight(self, slot: int, cluster: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ΔW [d_out, d_in] of one adapter (for tests and small checks)."""
        return adapter_delta_weight(self.U, self.V, self.sigma, slot, cluster, dtype)


@dataclass
class Bundle:
    """A bundle in memory: its config, the factors of each module (keyed by module path) and its report."""

    config: JDLoraConfig
    modules: dict[str, ModuleFactors]
    report: Optional[BundleReport] = None
    extra_files: dict[str, str] = field(default_factory=dict)  # file name -> text (e.g. README.md)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "report" and isinstance(value, Mapping):  # a report given as its JSON is read into the type
            value = BundleReport.from_dict(dict(value))
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Check the tensors against the config (names, float dtypes, shapes, targets) and that every value is
        finite; raise `BundleFormatError` naming the tensor or field at fault."""
        self.config.validate()
        entries = {
            f"{KEY_PREFIX}{module}.{name}": (dtype_name(tensor.dtype), tuple(tensor.shape))
            for module, f in self.modules.items()
            for name, tensor in zip(FACTOR_NAMES, (f.U, f.V, f.sigma))
        }
        check_entries(self.config, entries, "the bundle")
        for module, f in self.modules.items():
            for name, tensor in zip(FACTOR_NAMES, (f.U, f.V, f.sigma)):
                if not torch.isfinite(tensor).all():
                    raise BundleFormatError(f"tensor {KEY_PREFIX}{module}.{name!s} holds NaN or inf values.")

    def cluster_of(self, module: str, slot: int) -> int:
        return self.config.clusters_for(module)[slot]

    def delta_weight(self, module: str, adapter: Union[str, int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        slot = self.config.resolve_adapter(adapter)
        return self.modules[module].delta_weight(slot, self.cluster_of(module, slot), dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for module, f in self.modules.items():
            for name, tensor in zip(FACTOR_NAMES, (f.U, f.V, f.sigma)):
                tensors[f"{KEY_PREFIX}{module}.{name}"] = tensor.detach().contiguous()
        return tensors


# ------------------------------------------------------------------------------------------------ atomic output


@contextmanager
def atomic_output_dir(output_dir: Union[str, os.PathLike], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir` that replaces it only if the block succeeds.

    Nothing is left behind on failure, and an existing `output_dir` is never touched unless `overwrite=True`.
    """
    target = Path(output_dir)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bundle_files(bundle: Bundle, folder: Union[str, os.PathLike], *, with_report: bool = True) -> None:
    """Write the bundle's files into an existing folder (no atomicity: see `save_bundle`). `with_report=False` leaves
    the report to the caller (the jdlora tools write it last, once, with their verification)."""
    folder = Path(folder)
    bundle.validate()
    if bundle.config.base_model_type is None:  # record what the bundle is for, where the base model can be found
        bundle.config.base_model_type = model_type_of(bundle.config.base_model_name_or_path)
    save_file(bundle.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    bundle.config.save_pretrained(str(folder))
    if with_report and bundle.report is not None:
        (folder / REPORT_NAME).write_text(bundle.report.to_json())
    for name, text in bundle.extra_files.items():
        (folder / name).write_text(text)


def save_bundle(bundle: Bundle, output_dir: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """Validate and write a bundle atomically: `output_dir` appears complete or not at all."""
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        write_bundle_files(bundle, tmp)
    return Path(output_dir)


# ------------------------------------------------------------------------------------------------ loading


def _resolve_folder(path_or_repo: Union[str, os.PathLike], revision: Optional[str]) -> Path:
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists():
        raise BundleFormatError(f"{path} is a file; a bundle is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}.")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(str(path_or_repo), revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"])
    )


def read_json_object(file: Path, error: type[Exception] = BundleFormatError, holds: str = "fields") -> dict[str, Any]:
    """The JSON object `file` holds; `error` naming the file when it is not valid JSON or holds another JSON value
    (a config, a report: objects of `holds`)."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{file} holds a JSON {type(data).__name__}, not an object of {holds}.")
    return data


def read_config(folder: Path) -> JDLoraConfig:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise BundleFormatError(f"{folder} holds no {CONFIG_NAME}: not a PEFT adapter folder.")
    data = read_json_object(config_file, holds="config fields")
    if data.get("peft_type") != "JDLORA":
        raise BundleFormatError(
            f"{config_file} has peft_type {data.get('peft_type')!r}, not 'JDLORA': not a JD-LoRA bundle."
        )
    known = set(JDLoraConfig.__dataclass_fields__)
    try:
        return JDLoraConfig(**{k: v for k, v in data.items() if k in known})
    except ValueError as err:  # BundleFormatError, or PEFT's own check of task_type
        raise BundleFormatError(f"{config_file}: {err}") from None


def _pickled_weights_header(weights_file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype name, shape)} of a PEFT `adapter_model.bin`, read as PEFT reads it (`weights_only=True`: tensors
    only, no code) and memory-mapped, so that no value is read here."""
    try:
        tensors = torch.load(weights_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # weights_only refuses anything but tensors and containers: report what it says
        raise BundleFormatError(f"{weights_file} cannot be read as tensors: {err}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise BundleFormatError(f"{weights_file} does not hold a mapping of names to tensors.")
    return {k: (dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()}


def locate_weights(
    path_or_repo: Union[str, os.PathLike], subfolder: Optional[str] = None, hub_kwargs: Optional[dict[str, Any]] = None
) -> Path:
    """The weights file beside a bundle's config (a local folder, or the Hub repo the config came from), looked for
    as PEFT does: adapter_model.safetensors, else adapter_model.bin."""
    folder = Path(path_or_repo, subfolder) if subfolder else Path(path_or_repo)
    if folder.is_dir():
        for name in (WEIGHTS_NAME, PICKLED_WEIGHTS_NAME):
            if (folder / name).is_file():
                return folder / name
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        for name in (WEIGHTS_NAME, PICKLED_WEIGHTS_NAME):
            try:
                return Path(hf_hub_download(str(path_or_repo), name, subfolder=subfolder, **(hub_kwargs or {})))
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError:
                continue
    raise BundleFormatError(f"{folder} holds {CONFIG_NAME} but no {WEIGHTS_NAME}: the bundle's weights are missing.")


def read_weights_header(weights_file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    if weights_file.name == PICKLED_WEIGHTS_NAME:
        return _pickled_weights_header(weights_file)
    return weights_header(weights_file)


def check_weights_header_of(
    config: JDLoraConfig,
    path_or_repo: Union[str, os.PathLike],
    subfolder: Optional[str] = None,
    hub_kwargs: Optional[dict[str, Any]] = None,
) -> dict[str, tuple[int, int]]:
    """Check the names, dtypes and shapes of a bundle's weights against its config (`check_entries`) without
    reading any value; returns {module: (d_out, d_in)}."""
    weights_file = locate_weights(path_or_repo, subfolder, hub_kwargs)
    return check_entries(config, read_weights_header(weights_file), str(weights_file))


def load_bundle(path_or_repo: Union[str, os.PathLike], revision: Optional[str] = None) -> Bundle:
    """Read a bundle from a local folder or a Hub repo (at `revision`) and check it against its config: the header
    first (names, dtypes, shapes, targets), then the values (finite)."""
    folder = _resolve_folder(path_or_repo, revision)
    config = read_config(folder)
    weights_file = locate_weights(folder)
    check_entries(config, read_weights_header(weights_file), str(weights_file))
    try:
        if weights_file.name == PICKLED_WEIGHTS_NAME:
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise BundleFormatError(f"{weights_file} cannot be read: {err}") from None
    modules = _modules_from_state_dict(tensors, str(weights_file))
    report_file = folder / REPORT_NAME
    report = None
    if report_file.is_file():
        report = BundleReport.from_dict(read_json_object(report_file, holds="report fields"), str(report_file))
    bundle = Bundle(config=config, modules=modules, report=report)
    try:
        bundle.validate()
    except BundleFormatError as err:
        raise BundleFormatError(f"{folder}: {err}") from None
    return bundle


def _modules_from_state_dict(tensors: dict[str, torch.Tensor], where: str) -> dict[str, ModuleFactors]:
    """Group checked tensors (see `check_entries`) by module."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, name = key.removeprefix(KEY_PREFIX).rpartition(".")
        grouped.setdefault(module, {})[name] = tensor
    return {m: ModuleFactors(p["jd_U"], p["jd_V"], p["jd_sigma"]) for m, p in sorted(grouped.items())}


def bundle_from_model(model: Any, bundle_name: str = "default") -> Bundle:
    """The bundle `bundle_name` as currently held by a model's JD-LoRA layers (a `JDLoraModel` or `PeftModel`)."""
    from .layer import JDLoraLayer

    tuner = model.base_model if hasattr(model, "active_peft_config") else model
    inner = tuner.model
    modules = {}
    for name, module in inner.named_modules():
        if isinstance(module, JDLoraLayer) and bundle_name in module.jd_U:
            modules[name] = ModuleFactors(
                module.jd_U[bundle_name].detach(),
                module.jd_V[bundle_name].detach(),
                module.jd_sigma[bundle_name].detach(),
            )
    return Bundle(config=tuner.peft_config[bundle_name], modules=modules)


# ------------------------------------------------------------------------------------------------ export to LoRA


def lora_factors(bundle: Bundle, adapter: Union[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One adapter as LoRA factors per module: (A [r, d_in], B [d_out, r]) with ΔW = B·A (scaling 1)."""
    slot = bundle.config.resolve_adapter(adapter)
    if slot < 0:
        raise ValueError("the base model (-1 / None) is not an adapter and cannot be exported.")
    out = {}
    for module, f in bundle.modules.items():
        c = bundle.cluster_of(module, slot)
        out[module] = (f.V[c].clone(), (f.U[c].float() @ adapter_core(f.sigma, slot).float()).to(f.U.dtype))
    return out


def export_lora(
    bundle: Bundle, adapter: Union[str, int], output_dir: Union[str, os.PathLike], overwrite: bool = False
) -> str:
    """Write one adapter of the bundle as a PEFT LoRA folder of rank r (per module) that PEFT's LoRA loads."""
    from peft import LoraConfig

    slot = bundle.config.resolve_adapter(adapter)
    factors = lora_factors(bundle, slot)
    ranks = {module: a.shape[0] for module, (a, _) in factors.items()}
    r = max(ranks.values())
    rank_pattern = {m: k for m, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,  # scaling alpha/r = 1: Σ already carries the source adapter's scaling
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        target_modules=sorted(factors),
        fan_in_fan_out=bundle.config.fan_in_fan_out,
        base_model_name_or_path=bundle.config.base_model_name_or_path,
        task_type=bundle.config.task_type,
        lora_dropout=0.0,
        bias="none",
    )
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return str(output_dir)
