"""Real PEFT folders for tests and demos: LoRA adapters saved by PEFT itself, and base models saved by transformers.

Adapters are made with `LoraConfig(init_lora_weights=False)` so that lora_B is random rather than zero: every adapter
then changes the model's outputs, which is what a logits comparison needs.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..output import CONFIG_NAME, WEIGHTS_NAME


def save_base_model(model: Any, folder: Union[str, Path]) -> Path:
    """Save a transformers model with `save_pretrained` (config.json + model.safetensors)."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    return folder


def make_lora_adapter(
    base_model: Any,
    folder: Union[str, Path],
    *,
    seed: int,
    base_model_name: str,
    r: int = 4,
    lora_alpha: Optional[int] = None,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    task_type: Optional[str] = "CAUSAL_LM",
    use_dora: bool = False,
    use_rslora: bool = False,
    scale: float = 1.0,
    safe_serialization: bool = True,
) -> Path:
    """Train-free LoRA adapter on a copy of `base_model`, saved by PEFT's `save_pretrained` into `folder`.

    `base_model_name` is recorded as the adapter's `base_model_name_or_path` (e.g. the base model's Hub id);
    `scale` multiplies lora_B, to make adapters of visibly different strength.
    """
    from peft import LoraConfig, get_peft_model

    folder = Path(folder)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        target_modules=list(target_modules),
        init_lora_weights=False,
        lora_dropout=0.0,
        use_dora=use_dora,
        use_rslora=use_rslora,
        task_type=task_type,
    )
    base = copy.deepcopy(base_model)
    base.config._name_or_path = base_model_name  # PEFT records it in adapter_config.json and the card
    with warnings.catch_warnings():
        # PEFT warns that the (made-up) base model name has no config to check the vocabulary against, and that
        # GPT-2's Conv1D needs fan_in_fan_out (which it then sets itself): both expected here.
        warnings.simplefilter("ignore", UserWarning)
        model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.peft_config["default"].base_model_name_or_path = base_model_name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(str(folder), safe_serialization=safe_serialization)
    # PEFT writes the base model's own name_or_path into the card; keep config and card in agreement.
    data = json.loads((folder / CONFIG_NAME).read_text())
    data["base_model_name_or_path"] = base_model_name
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True))
    return folder


def corrupt_weights(folder: Union[str, Path], keep_bytes: int = 64) -> Path:
    """Truncate an adapter's safetensors file (a download cut short): it no longer parses."""
    weights = Path(folder) / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[:keep_bytes])
    return weights
