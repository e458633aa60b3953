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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import BundleFormatError, JDLoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "jdlora_report.json"
KEY_PREFIX = "base_model.model."
FACTOR_NAMES = ("jd_U", "jd_V", "jd_sigma")


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
        core = self.sigma[slot] if self.sigma.dim() == 3 else torch.diag(self.sigma[slot])
        return self.U[cluster].to(dtype) @ core.to(dtype) @ self.V[cluster].to(dtype)


@dataclass
class Bundle:
    """A bundle in memory: its config, the factors of each module (keyed by module path) and its report."""

    config: JDLoraConfig
    modules: dict[str, ModuleFactors]
    report: Optional[dict[str, Any]] = None
    extra_files: dict[str, str] = field(default_factory=dict)  # file name -> text (e.g. README.md)

    def validate(self) -> None:
        """Check that every module's tensors agree with the config; raise `BundleFormatError` naming the module."""
        self.config.validate()
        if not self.modules:
            raise BundleFormatError("the bundle has no modules.")
        n = self.config.num_adapters
        for module, f in self.modules.items():
            r = self.config.rank_for(module)
            c = self.config.num_clusters_for(module)
            sigma_type = self.config.sigma_for(module)
            d_out, d_in = f.U.shape[1], f.V.shape[2]
            expected = {
                "jd_U": (c, d_out, r),
                "jd_V": (c, r, d_in),
                "jd_sigma": (n, r, r) if sigma_type == "full" else (n, r),
            }
            for name, tensor in zip(FACTOR_NAMES, (f.U, f.V, f.sigma)):
                if tuple(tensor.shape) != expected[name]:
                    raise BundleFormatError(
                        f"module {module!r}: {name} has shape {tuple(tensor.shape)}, the config implies "
                        f"{expected[name]} (rank {r}, {c} clusters, {n} adapters, sigma_type {sigma_type})."
                    )
                if not torch.isfinite(tensor).all():
                    raise BundleFormatError(f"module {module!r}: {name} holds NaN or inf values.")

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


def write_bundle_files(bundle: Bundle, folder: Union[str, os.PathLike]) -> None:
    """Write the bundle's files into an existing folder (no atomicity: see `save_bundle`)."""
    folder = Path(folder)
    bundle.validate()
    save_file(bundle.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    bundle.config.save_pretrained(str(folder))
    if bundle.report is not None:
        (folder / REPORT_NAME).write_text(json.dumps(bundle.report, indent=2, sort_keys=True) + "\n")
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


def read_config(folder: Path) -> JDLoraConfig:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise BundleFormatError(f"{folder} holds no {CONFIG_NAME}: not a PEFT adapter folder.")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise BundleFormatError(f"{config_file} is not valid JSON: {err}") from None
    if data.get("peft_type") != "JDLORA":
        raise BundleFormatError(
            f"{config_file} has peft_type {data.get('peft_type')!r}, not 'JDLORA': not a JD-LoRA bundle."
        )
    known = set(JDLoraConfig.__dataclass_fields__)
    try:
        return JDLoraConfig(**{k: v for k, v in data.items() if k in known})
    except BundleFormatError as err:
        raise BundleFormatError(f"{config_file}: {err}") from None


def load_bundle(path_or_repo: Union[str, os.PathLike], revision: Optional[str] = None) -> Bundle:
    """Read a bundle from a local folder or a Hub repo (at `revision`) and check it against its config."""
    folder = _resolve_folder(path_or_repo, revision)
    config = read_config(folder)
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise BundleFormatError(f"{folder} holds no {WEIGHTS_NAME}.")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise BundleFormatError(f"{weights_file} cannot be read: {err}") from None
    modules = _modules_from_state_dict(tensors, str(weights_file))
    report_file = folder / REPORT_NAME
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    bundle = Bundle(config=config, modules=modules, report=report)
    try:
        bundle.validate()
    except BundleFormatError as err:
        raise BundleFormatError(f"{folder}: {err}") from None
    return bundle


def _modules_from_state_dict(tensors: dict[str, torch.Tensor], where: str) -> dict[str, ModuleFactors]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, name = key.removeprefix(KEY_PREFIX).rpartition(".")
        if name not in FACTOR_NAMES:
            raise BundleFormatError(f"{where}: unexpected tensor {key!r} (a JD-LoRA bundle holds {FACTOR_NAMES}).")
        grouped.setdefault(module, {})[name] = tensor
    modules = {}
    for module, parts in sorted(grouped.items()):
        missing = [n for n in FACTOR_NAMES if n not in parts]
        if missing:
            raise BundleFormatError(f"{where}: module {module!r} lacks tensors {missing}.")
        modules[module] = ModuleFactors(parts["jd_U"], parts["jd_V"], parts["jd_sigma"])
    return modules


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
        core = f.sigma[slot] if f.sigma.dim() == 3 else torch.diag(f.sigma[slot])
        out[module] = (f.V[c].clone(), (f.U[c].float() @ core.float()).to(f.U.dtype))
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
