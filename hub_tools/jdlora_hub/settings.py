"""The compression settings and the cost model for the commands, without importing torch.

`peft_jdlora.compression.settings` (`CompressionSettings`, `CompressionSettingsError`) and `.cost` (the budget
grammar) import no torch, but importing them the ordinary way runs `peft_jdlora`'s `__init__`, which imports torch and
PEFT: seconds before a bad option could be refused. `compression_module` loads them from their files instead and
registers them under their own names, so that `peft_jdlora`, imported later by the command that runs, uses these same
modules: one `CompressionSettings` class, whoever made the object.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

# peft_jdlora.compression's modules that import no torch, each after those it imports.
TORCH_FREE = ("cost", "settings")

QUOTES = "'\""
# The command line's options for the settings they set (`CompressionSettingsError.render`).
OPTION_NAMES = {
    "rank": "--rank",
    "sigma": "--sigma",
    "clusters": "--clusters",
    "method": "--method",
    "target_error": "--target-error",
    "budget": "--budget",
    "target_error_every": "--every-adapter",
    "max_iter": "--max-iter",
    "tol": "--tol",
    "seed": "--seed",
    "device": "--device",
    "dtype": "--dtype",
}


def compression_module(name: str) -> ModuleType:
    """`peft_jdlora.compression.<name>` for `name` in `TORCH_FREE`, imported without importing torch when
    `peft_jdlora` is not imported yet."""
    if name not in TORCH_FREE:
        raise ValueError(f"peft_jdlora.compression.{name} is not one of the torch-free modules {TORCH_FREE}.")
    full = f"peft_jdlora.compression.{name}"
    if full in sys.modules:
        return sys.modules[full]
    folder = _compression_folder()
    if "peft_jdlora" in sys.modules or folder is None:  # imported already, or an unusual install: the ordinary way
        return importlib.import_module(full)
    for dependency in TORCH_FREE[: TORCH_FREE.index(name) + 1]:
        qualified = f"peft_jdlora.compression.{dependency}"
        if qualified in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(qualified, folder / f"{dependency}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module  # before it runs: its dataclasses look their module up, its imports find it
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[qualified]
            raise
    return sys.modules[full]


def _compression_folder() -> Optional[Path]:
    package = importlib.util.find_spec("peft_jdlora")
    locations = list(package.submodule_search_locations or []) if package else []
    folder = Path(locations[0]) / "compression" if locations else None
    return folder if folder is not None and all((folder / f"{m}.py").is_file() for m in TORCH_FREE) else None


def settings_module() -> ModuleType:
    """`peft_jdlora.compression.settings` (see `compression_module`)."""
    return compression_module("settings")


def option_spelling(setting: str, value: Optional[str]) -> str:
    """`--clusters auto`: a setting as the command line's option (its Python name if it has none)."""
    option = OPTION_NAMES.get(setting, setting)
    if value is None or setting == "target_error_every":
        return option
    return f"{option} {value.strip(QUOTES)}"


__all__ = ["OPTION_NAMES", "TORCH_FREE", "compression_module", "option_spelling", "settings_module"]
