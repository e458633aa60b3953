"""Verification of a bundle before it is written or pushed.

1. Every adapter's error is known (computed by the engine, or here with `evaluate`) and finite, and none exceeds
   `--max-error`.
2. The written files read back into exactly the tensors that were computed (`load_bundle`).
3. When the base model is available, the bundle is loaded the way users load it (`PeftModel.from_pretrained` with
   `adapter_ids`) and its logits on a few tokens are compared with the original adapters' logits under PEFT's own LoRA:
   the relative error of each adapter's effect, ‖y_bundle − y_lora‖ / ‖y_lora − y_base‖, is reported (and checked
   against `--max-logit-error` when given).

Any failure raises `VerificationError`, and the callers write nothing and push nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .card import format_error
from .errors import SourceError, VerificationError
from .sources import HubClient, parse_source

if TYPE_CHECKING:
    from peft_jdlora.report import BundleReport

NUM_TOKENS = 8
_WEIGHT_PATTERNS = {"safetensors": ["*.json", "*.safetensors"], "bin": ["*.json", "*.bin"]}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_errors(bundle: Any, adapters: Sequence[Any], max_error: Optional[float]) -> dict[str, float]:
    """Make sure every adapter of `adapters` has a finite error in `bundle.report` (computing missing ones with
    `evaluate`), and that none exceeds `max_error`. Returns {name: mean error}."""
    from peft_jdlora.compression import evaluate
    from peft_jdlora.report import BundleReport

    if bundle.report is None:
        bundle.report = BundleReport()
    per_adapter = bundle.report.per_adapter
    missing = [a for a in adapters if a.name not in per_adapter or not per_adapter[a.name].has_error]
    if missing:
        per_adapter.update(evaluate(bundle, missing).per_adapter)
        bundle.report.refresh_overall()
    errors = {}
    for adapter in adapters:
        value = per_adapter[adapter.name].mean_error if adapter.name in per_adapter else None
        if not _finite(value):
            raise VerificationError(f"the error of adapter {adapter.name!r} could not be computed (got {value!r}).")
        errors[adapter.name] = float(value)
    if max_error is not None:
        over = sorted(((e, n) for n, e in errors.items() if e > max_error), reverse=True)
        if over:
            listed = ", ".join(f"{n} ({format_error(e)})" for e, n in over[:5]) + (", ..." if len(over) > 5 else "")
            raise VerificationError(
                f"{len(over)} of {len(errors)} adapters exceed --max-error {max_error:g}: {listed}. Raise --rank or "
                "--clusters, or allow a larger --max-error."
            )
    return errors


def check_reload(bundle: Any, folder: Path) -> None:
    """The files in `folder` must read back into exactly the bundle's config and tensors."""
    import torch

    from peft_jdlora import BundleFormatError, load_bundle

    try:
        loaded = load_bundle(folder)
    except BundleFormatError as err:
        raise VerificationError(f"the written bundle does not load: {err}") from None
    if loaded.config.adapter_names != bundle.config.adapter_names:
        raise VerificationError("the written bundle reads back with different adapter names.")
    if set(loaded.modules) != set(bundle.modules):
        raise VerificationError("the written bundle reads back with different modules.")
    for module, factors in bundle.modules.items():
        back = loaded.modules[module]
        for name in ("U", "V", "sigma"):
            a, b = getattr(factors, name), getattr(back, name)
            if a.shape != b.shape or not torch.equal(a.detach().cpu().to(b.dtype), b):
                raise VerificationError(f"the written bundle reads back with different {name} in module {module!r}.")


# ---------------------------------------------------------------------------------------------------- base model


def find_base_model(
    base_model: Optional[str],
    recorded: Optional[str],
    hub: Callable[[], HubClient],
) -> tuple[Optional[Path], str, Optional[str]]:
    """(folder, name, reason skipped) of the base model for the logits check.

    `base_model` (--base-model) may be a folder or a Hub id[@revision] and is downloaded if needed; without it, the
    adapters' recorded base model is used only if it is a local folder or already in the Hugging Face cache: the
    check never downloads a base model the user did not ask for.
    """
    if base_model is not None:
        path = Path(base_model).expanduser()
        if path.is_dir():
            return path, base_model, None
        spec = parse_source(base_model)
        if spec.kind != "hub":
            raise SourceError(f"--base-model {base_model!r} is neither a folder nor a Hub repo id.")
        client = hub()
        sha, files = client.resolve(spec.location, spec.revision)
        kind = "safetensors" if any(f.endswith(".safetensors") for f in files) else "bin"
        return client.download(spec.location, sha, _WEIGHT_PATTERNS[kind]), f"{spec.location}@{sha[:10]}", None
    if not recorded:
        return None, "", "the adapters do not record their base model; pass --base-model"
    path = Path(recorded).expanduser()
    if path.is_dir():
        return path, recorded, None
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(recorded, "config.json")
    except Exception:  # not a valid repo id: nothing cached under that name
        cached = None
    if not isinstance(cached, str):
        return (
            None,
            recorded,
            f"{recorded!r} is not a local folder nor in the Hugging Face cache; "
            f"pass --base-model {recorded} to download it",
        )
    try:
        folder = Path(snapshot_download(recorded, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:
        return (
            None,
            recorded,
            f"{recorded!r} is only partly cached ({type(err).__name__}); pass --base-model {recorded}",
        )
    return folder, recorded, None


def _load_base(folder: Path, task_type: Optional[str], device: str) -> Any:
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if task_type == "CAUSAL_LM":
        cls = transformers.AutoModelForCausalLM
    elif task_type == "SEQ_2_SEQ_LM":
        cls = transformers.AutoModelForSeq2SeqLM
    else:
        # Without a task type PEFT keys the modules by their path in the model the adapter was trained on: the class
        # named in the checkpoint's config (e.g. LlamaForCausalLM) reproduces those paths.
        arch = (config.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
    model = cls.from_pretrained(str(folder), dtype=torch.float32)
    return model.to(device).eval()


def check_base_fits(base: Any, bundle: Any, base_name: str) -> None:
    """Every module of the bundle must exist in the base model with the shape the bundle was made for. Another model
    (another hidden size, another architecture) is bad input: it is named here, with the module, instead of failing
    deep inside PEFT's loading of the original adapters."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for module, factors in bundle.modules.items():
        try:
            layer = base.get_submodule(module)
        except AttributeError:
            raise SourceError(
                f"the base model {base_name} does not fit the bundle: it has no module {module!r}."
            ) from None
        if isinstance(layer, torch.nn.Linear):
            shape = (layer.out_features, layer.in_features)
        elif isinstance(layer, Conv1D):
            shape = (layer.nf, layer.weight.shape[0])
        else:  # the tuner names what it cannot patch
            continue
        if shape != tuple(factors.shape):
            raise SourceError(
                f"the base model {base_name} does not fit the bundle: module {module!r} is {shape[0]}x{shape[1]} "
                f"(out x in) there, {factors.shape[0]}x{factors.shape[1]} in the bundle (another model size?)."
            )


def _forward(model: Any, input_ids: Any, **kwargs: Any) -> Any:
    import torch

    extra = {}
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        extra["decoder_input_ids"] = input_ids
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def pick_adapters(names: Sequence[str], report: Optional[BundleReport], k: int) -> list[str]:
    """Up to k adapters to check: the worst one first, then others spread over the bundle."""
    chosen: list[str] = []
    worst = report.overall.worst_adapter if report is not None else None
    if worst in names:
        chosen.append(worst)
    if k > 1 and names:
        step = max(1, len(names) // max(1, k - 1))
        for name in list(names[::step]) + list(names):
            if len(chosen) >= k:
                break
            if name not in chosen:
                chosen.append(name)
    return chosen[:k]


def base_model_check(
    bundle_folder: Path,
    bundle: Any,
    originals: Mapping[str, Path],
    base_folder: Path,
    base_name: str,
    *,
    k: int = 3,
    device: str = "cpu",
    max_logit_error: Optional[float] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare the bundle's logits (JDLORA, `adapter_ids`) with the original adapters' (PEFT LoRA) on the base model."""
    import torch
    from peft import PeftModel

    import peft_jdlora  # noqa: F401  (registers JDLORA with PEFT)

    names = pick_adapters([n for n in bundle.config.adapter_names if n in originals], bundle.report, k)
    if not names:
        return {"status": "skipped", "reason": "no original adapter folder at hand", "base_model": base_name}
    base = _load_base(base_folder, bundle.config.task_type, device)
    check_base_fits(base, bundle, base_name)
    vocab = base.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(min(3, vocab - 1), vocab, (len(names), NUM_TOKENS), generator=gen).to(device)

    y_base = _forward(base, input_ids)
    lora = None
    y_lora = torch.empty_like(y_base)
    for i, name in enumerate(names):
        adapter_name = f"source_{i}"
        if lora is None:
            lora = PeftModel.from_pretrained(base, str(originals[name]), adapter_name=adapter_name)
        else:
            lora.load_adapter(str(originals[name]), adapter_name=adapter_name)
        lora.set_adapter(adapter_name)
        y_lora[i : i + 1] = _forward(lora, input_ids[i : i + 1])
    base = lora.unload()  # the base model without LoRA layers, for the bundle

    model = PeftModel.from_pretrained(base, str(bundle_folder))
    y_bundle = _forward(model, input_ids, adapter_ids=list(names))
    if not torch.isfinite(y_bundle).all():
        raise VerificationError(f"the bundle gives NaN or inf logits on the base model {base_name}.")

    rows = []
    for i, name in enumerate(names):
        diff = (y_bundle[i] - y_lora[i]).norm().item()
        effect = (y_lora[i] - y_base[i]).norm().item()
        rows.append(
            {
                "name": name,
                "effect_error": diff / effect if effect > 0 else (0.0 if diff == 0 else math.inf),
                "logits_error": diff / max(y_lora[i].norm().item(), 1e-30),
            }
        )
    result = {
        "status": "ok",
        "base_model": base_name,
        "tokens": NUM_TOKENS,
        "adapters": rows,
        "max_effect_error": max(r["effect_error"] for r in rows),
    }
    if max_logit_error is not None:
        over = [r for r in rows if not r["effect_error"] <= max_logit_error]
        if over:
            listed = ", ".join(f"{r['name']} ({format_error(r['effect_error'])})" for r in over)
            raise VerificationError(
                f"the bundle's logits differ from the original adapters' by more than --max-logit-error "
                f"{max_logit_error:g} on {base_name}: {listed}."
            )
    return result
