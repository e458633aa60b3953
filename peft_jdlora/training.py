"""Train a new adapter inside a loaded bundle's basis: only its Σ learns, r² (or r) numbers per module.

    model = PeftModel.from_pretrained(base, "org/jdlora-bundle", is_trainable=True)
    adapter = peft_jdlora.add_trainable_adapter(model, "new_task", init="zeros")
    trainer = transformers.Trainer(model=model, args=..., train_dataset=...)   # only new_task's Σ requires grad
    trainer.train()
    model.save_pretrained("bundle-plus-new_task/")     # the bundle with new_task appended, written atomically

How: every JD-LoRA layer of the bundle gets one more Σ (`JDLoraLayer.jd_sigma_trained`), used as slot N after the
bundle's N adapters, in the cluster chosen for it at that module. Rows of the new adapter (its name in `adapter_ids`,
or every row given no id while it is the default adapter) compute U_c Σ_new V_cᵀ x, other rows their own adapters,
exactly as when serving; so a mixed training batch trains the new adapter on its rows only. The bases U, V, the N
adapters' Σ and the base model are frozen (requires_grad False, and checked bit-identical when saving). Nothing else
changes in the forward: gradient checkpointing, autocast (bf16 / fp16) and the Trainer work as with any PEFT model.

Choices (docs/training.md has the measurements):

- `init`: "zeros" (the model starts as the base model; Σ still gets a gradient at 0, unlike LoRA's B = 0 with A = 0),
  "mean" (the mean Σ of the cluster's adapters: starts from the cluster's average task), or "project:<LoRA folder>"
  (least-squares projection of a trained LoRA into the basis, what `jdlora add` stores; training then recovers part of
  what the projection lost).
- `cluster`: "auto" (default), a cluster id, or an existing adapter's name (train in that adapter's clusters at every
  module). "auto" takes the projection's choice with init="project:..." (least reconstruction error), otherwise the
  cluster whose bases capture the largest share of the new task's loss gradient at the base model (`cluster_scores`:
  one forward and backward pass per probe batch, for all clusters at once).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import time
import types
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .batch import AdapterRouter, ClusterTable
from .bundle import (
    BUNDLE_FILES,
    CARD_NAME,
    CONFIG_NAME,
    FLOAT_DTYPES,
    KEY_PREFIX,
    REPORT_NAME,
    Bundle,
    ModuleFactors,
    atomic_output_dir,
    locate_weights,
    read_weights_header,
    write_bundle_files,
)
from .config import BundleFormatError, JDLoraConfig
from .layer import JDLoraLayer
from .report import AdapterReport, BundleReport

TRAINED_SOURCE = "trained in basis"
INIT_CHOICES = ("zeros", "mean", "project:<LoRA folder>")
# Attribute of the tuner (JDLoraModel) holding {bundle name: TrainableAdapter}.
STATE_ATTR = "_jdlora_trainable"
# Attribute of the router set by `enable_activation_checkpointing`: the recomputed layers see the call's routing.
REPLAY_ATTR = "replays_routing_in_recompute"
_DEFAULT_GROUP = "<default>"  # the modules that use the config's adapter_clusters (no cluster_pattern entry)


class NonFiniteLossError(FloatingPointError):
    """The training loss of an adapter trained in a bundle's basis became NaN or infinite."""


class TrainingSetupError(ValueError):
    """`add_trainable_adapter` or `cluster_scores` refuses its arguments, the model or the bundle's layout, or a
    trained bundle is asked of a bundle training no adapter; the message says why and what to do. A `ValueError`, as
    such refusals are in Python."""


# ---------------------------------------------------------------------------------------------------- the handle


@dataclass
class TrainableAdapter:
    """An adapter being trained in a bundle's basis (returned by `add_trainable_adapter`).

    `sigma` maps each module to its trainable Σ ([r, r] or [r], float32); modules stored as per-adapter SVD hold a
    frozen zero Σ there unless the adapter was given its own basis (init="project:..."). `steps` counts optimizer
    steps that updated the adapter, `batches` and `tokens` the training forward passes it saw; `data_sha256` is a
    running SHA-256 of their token ids and labels, unless `record_data` names the data instead.
    """

    name: str
    bundle: str
    slot: int
    init: str
    clusters: dict[str, int]
    cluster_choice: dict[str, Any]
    sigma: dict[str, nn.Parameter]
    untrained_modules: list[str] = field(default_factory=list)
    steps: int = 0
    batches: int = 0
    tokens: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    original_default: Optional[Union[str, int]] = None
    storage_dtype: Optional[torch.dtype] = None
    source_report: Optional[BundleReport] = None
    loaded_from: Optional[tuple[str, Optional[str], Optional[str]]] = None
    target_modules: Any = None  # as the source bundle wrote them
    fingerprints: dict[str, str] = field(default_factory=dict, repr=False)
    _stream_hash: Any = field(default_factory=hashlib.sha256, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def num_trainable_params(self) -> int:
        """Numbers that learn: r² (full Σ) or r (diagonal Σ) per module with a basis."""
        return sum(p.numel() for p in self.sigma.values() if p.requires_grad)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable Σ tensors (for an optimizer)."""
        return [p for p in self.sigma.values() if p.requires_grad]

    def nonfinite_module(self) -> Optional[str]:
        """The first module whose Σ holds a NaN or inf value (a diverged step), or None."""
        return next((module for module, param in self.sigma.items() if not torch.isfinite(param).all()), None)

    @property
    def data_sha256(self) -> str:
        """SHA-256 of the training data: the one given to `record_data`, else of the token ids and labels of every
        training batch seen, in order."""
        return self.data.get("sha256") or self._stream_hash.hexdigest()

    def record_data(self, sha256: Optional[str] = None, **info: Any) -> None:
        """Name the training data in the saved provenance: e.g. `record_data(sha256=<of train.jsonl>, file=...)`.
        Without it, the provenance holds the hash of the token stream the adapter was trained on."""
        if sha256 is not None:
            self.data["sha256"] = sha256
        self.data.update(info)

    def source_entry(self) -> dict[str, Any]:
        """The adapter's `adapter_sources` entry in the saved bundle."""
        from . import __version__

        entry: dict[str, Any] = {
            "source": TRAINED_SOURCE,
            "type": "trained",
            "init": self.init.partition(":")[0],  # "zeros", "mean" or "project"
            "cluster": self.cluster_choice.get("default_cluster", 0),
            "cluster_choice": self.cluster_choice.get("method"),
            "steps": self.steps,
            "batches": self.batches,
            "tokens": self.tokens,
            "data_sha256": self.data_sha256,
            "data_hash_of": "data" if self.data.get("sha256") else "training batches (token ids and labels)",
            "trainable_params": self.num_trainable_params,
            "peft_jdlora": __version__,
        }
        if self.init.startswith("project:"):
            # A field of its own: a push publishes absolute local paths redacted, and only whole-path strings are.
            entry["init_lora"] = str(Path(self.init.removeprefix("project:")).expanduser().resolve())
        entry.update({k: v for k, v in self.data.items() if k != "sha256"})
        return entry

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


# ---------------------------------------------------------------------------------------------------- helpers


def _tuner_of(model: nn.Module) -> Any:
    from .model import JDLoraModel

    if isinstance(model, JDLoraModel):
        return model
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, JDLoraModel):
        return tuner
    raise TypeError(
        "expected a PeftModel holding a JD-LoRA bundle (PeftModel.from_pretrained(base, bundle, is_trainable=True)), "
        f"got a {type(model).__name__}."
    )


def _bundle_layers(tuner: Any, bundle: str) -> dict[str, JDLoraLayer]:
    """{module path in the transformers model (the bundle's key): layer} of one bundle."""
    return {
        name: module
        for name, module in tuner.model.named_modules()
        if isinstance(module, JDLoraLayer) and bundle in module.jd_U
    }


def trainable_adapter(model: nn.Module, bundle: Optional[str] = None) -> Optional[TrainableAdapter]:
    """The adapter being trained in `bundle` (the active bundle by default), or None."""
    tuner = _tuner_of(model)
    return tuner.__dict__.get(STATE_ATTR, {}).get(tuner._bundle_name(bundle))


def _pattern_key(config: JDLoraConfig, module: str) -> Optional[str]:
    """The `cluster_pattern` key that applies to `module`, or None: resolved by the config itself, so that its key
    matching and precedence rules hold here too."""
    return config.pattern_key(config.cluster_pattern, module)


def _group_of(config: JDLoraConfig, module: str) -> str:
    """The modules that share one cluster assignment: the default one, or one cluster_pattern entry."""
    return _pattern_key(config, module) or _DEFAULT_GROUP


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _frozen_fingerprints(layers: Mapping[str, JDLoraLayer], bundle: str) -> dict[str, str]:
    return {
        f"{KEY_PREFIX}{module}.{name}": _tensor_digest(getattr(layer, name)[bundle])
        for module, layer in layers.items()
        for name in ("jd_U", "jd_V", "jd_sigma")
    }


@dataclass
class _Source:
    """What the model does not hold of the bundle it was loaded from: its report, its storage dtype, and its
    target_modules as written (PEFT shortens a long list to suffixes when it injects the layers)."""

    report: Optional[BundleReport] = None
    dtype: Optional[torch.dtype] = None
    target_modules: Any = None


def _read_source_json(path: str, subfolder: Optional[str], revision: Optional[str], name: str) -> Optional[Any]:
    folder = Path(path, subfolder) if subfolder else Path(path)
    try:
        if folder.is_dir():
            file = folder / name
            return json.loads(file.read_text()) if file.is_file() else None
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, name, subfolder=subfolder, revision=revision)).read_text())
    except Exception:  # no such file (a bundle without a report), or offline without it cached: start fresh
        return None


def _source_files(loaded_from: Optional[tuple[str, Optional[str], Optional[str]]]) -> _Source:
    """The bundle the model was loaded from, as far as it can be found (a bundle made with get_peft_model has none)."""
    if loaded_from is None:
        return _Source()
    path, subfolder, revision = loaded_from
    dtype = None
    try:
        header = read_weights_header(locate_weights(path, subfolder, {"revision": revision} if revision else None))
        sigma_dtypes = {dt for key, (dt, _) in header.items() if key.endswith(".jd_sigma")}
        dtype = FLOAT_DTYPES.get(next(iter(sigma_dtypes))) if len(sigma_dtypes) == 1 else None
    except Exception:  # the weights were read by PEFT a moment ago; if they are gone, keep the dtype held
        dtype = None
    config = _read_source_json(path, subfolder, revision, CONFIG_NAME) or {}
    found = _read_source_json(path, subfolder, revision, REPORT_NAME)
    try:  # a report that does not read is no report: the new one starts fresh, as without one
        report = BundleReport.from_dict(found) if found else None
    except BundleFormatError:
        report = None
    return _Source(report=report, dtype=dtype, target_modules=config.get("target_modules"))


def _copy_config(config: JDLoraConfig, **changes: Any) -> JDLoraConfig:
    """A new, validated config from `config` with `changes` (PEFT's own edits of the live config, such as a set of
    target_modules, are normalised on the way)."""
    data = config.to_dict()
    data.pop("peft_type", None)
    data.update(changes)
    known = set(JDLoraConfig.__dataclass_fields__)
    return JDLoraConfig(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------------- clusters


def _own_basis_modules(config: JDLoraConfig, layers: Mapping[str, JDLoraLayer], bundle: str, report: Any) -> set[str]:
    """Modules stored as per-adapter SVD (a singleton cluster per adapter, diagonal Σ): there is no shared basis to
    train in (as `compression.project` decides it)."""
    from .compression.api import _own_cluster_modules

    view = Bundle(
        config=config,
        modules={m: ModuleFactors(l.jd_U[bundle], l.jd_V[bundle], l.jd_sigma[bundle]) for m, l in layers.items()},
        report=report,
    )
    return _own_cluster_modules(view)


def cluster_scores(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], bundle: Optional[str] = None
) -> dict[str, dict[str, Any]]:
    """How well each cluster's bases suit a new task, from the loss gradient at the base model.

    For each module, G = ∂L/∂W (the gradient of the loss of `batches` with respect to the module's weight, with every
    row on the base model). A step ΔW = U_c ΔΣ V_c of unit Frobenius norm in cluster c lowers the loss by at most
    ‖P_U G P_V‖_F to first order (the projection of G onto the bases; for a diagonal Σ, the best diagonal step).
    A cluster's score is the sum over the modules that share one cluster assignment of that squared norm; the
    largest score is the basis in which training starts fastest. Costs one forward and backward pass per batch; G is
    never formed (the projections are computed from the layers' inputs and output gradients).

    Returns {group: {"modules": [...], "scores": [score per cluster], "best": cluster}} where a group is "<default>"
    (the modules following `adapter_clusters`) or a `cluster_pattern` key. `batches` hold model inputs with labels.
    """
    tuner = _tuner_of(model)
    bundle = tuner._bundle_name(bundle)
    config = tuner.peft_config[bundle]
    layers = _bundle_layers(tuner, bundle)
    grads: dict[str, torch.Tensor] = {}  # module -> [C, r, r]: Σ over batches of U_cᵀ G V_cᵀ (float64)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (module, input, output) of the batch in progress

    def capture(module_name: str, layer: JDLoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:  # the first patched layers: nothing before them requires grad
            output = output.detach().requires_grad_(True)
        seen.append((module_name, args[0].detach(), output))
        return output

    handles = [layer.register_forward_hook(functools.partial(capture, name)) for name, layer in layers.items()]
    num_batches = 0
    was_training = tuner.model.training
    try:
        tuner.model.eval()  # no dropout: the gradient of the model as it will start
        with _adapters_disabled(tuner), torch.enable_grad():
            for batch in batches:
                seen.clear()
                loss = tuner.model(**{k: v for k, v in batch.items() if k != "adapter_ids"}).loss
                if loss is None:
                    raise TrainingSetupError("cluster_scores needs batches with labels (the model returned no loss).")
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"the base model's loss on probe batch {num_batches} is {loss.item()}.")
                # autograd.grad, not backward: no parameter's .grad is touched
                output_grads = torch.autograd.grad(loss, [o for _, _, o in seen], allow_unused=True)
                for (name, x, _), grad in zip(seen, output_grads):
                    if grad is None:
                        continue
                    layer = layers[name]
                    U = layer.jd_U[bundle].detach().double()  # [C, d_out, r]
                    V = layer.jd_V[bundle].detach().double()  # [C, r, d_in]
                    h = torch.einsum("crd,td->tcr", V, x.reshape(-1, layer.in_features).double())  # [T, C, r]: V_c x
                    e = torch.einsum("cor,to->tcr", U, grad.reshape(-1, layer.out_features).double())  # U_cᵀ δ
                    g = torch.einsum("tcr,tcs->crs", e, h)  # [C, r, r]
                    grads[name] = grads[name] + g if name in grads else g
                num_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
        tuner.model.train(was_training)
    if num_batches == 0:
        raise TrainingSetupError("cluster_scores got no batches.")

    out: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        g = grads.get(name)
        if g is None:
            continue
        g = g / num_batches
        U = layer.jd_U[bundle].detach().double()
        V = layer.jd_V[bundle].detach().double()
        gram_u = torch.linalg.pinv(U.mT @ U)  # [C, r, r]
        gram_v = torch.linalg.pinv(V @ V.mT)  # [C, r, r]
        if layer.sigma_type[bundle] == "diag":
            g_diag = torch.diagonal(g, dim1=1, dim2=2)  # [C, r]
            gram = torch.linalg.pinv((U.mT @ U) * (V @ V.mT))
            score = torch.einsum("cr,crs,cs->c", g_diag, gram, g_diag)
        else:
            score = torch.einsum("cab,cbd,ced,cae->c", g, gram_v, g, gram_u)  # tr(gᵀ A⁻¹ g B⁻¹)
        group = _group_of(config, name)
        entry = out.setdefault(group, {"modules": [], "scores": torch.zeros_like(score)})
        if entry["scores"].shape != score.shape:
            raise TrainingSetupError(
                f"module {name!r} has {score.numel()} clusters, others of its group {group!r} differ."
            )
        entry["modules"].append(name)
        entry["scores"] = entry["scores"] + score
    for entry in out.values():
        entry["best"] = int(entry["scores"].argmax())
        entry["scores"] = [float(s) for s in entry["scores"]]
    return out


@contextlib.contextmanager
def _adapters_disabled(tuner: Any) -> Iterator[None]:
    layers = [m for m in tuner.model.modules() if isinstance(m, JDLoraLayer)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


def _least_squares_core(U: torch.Tensor, V: torch.Tensor, A: torch.Tensor, B: torch.Tensor, diag: bool) -> torch.Tensor:
    """Σ minimising ‖B A − U Σ V‖_F for one cluster: U [d_out, r], V [r, d_in], ΔW = B [d_out, k] @ A [k, d_in]
    (the compression's least-squares cores, in float64)."""
    from .compression.joint import diagonal_cores, full_cores

    U, V, A, B = U.double(), V.double(), A.double(), B.double()
    core = (U.T @ B) @ (A @ V.T)  # [r, r] = Uᵀ ΔW Vᵀ
    if diag:
        return diagonal_cores(U.T @ U, V @ V.T, torch.diagonal(core))
    return full_cores(U.T @ U, V @ V.T, core)


@dataclass
class _Plan:
    """What `add_trainable_adapter` will do, computed before anything in the model changes."""

    clusters: dict[str, int]  # module -> cluster of the new adapter (an appended index for own-basis modules)
    sigma: dict[str, torch.Tensor]  # module -> initial Σ (float32)
    new_bases: dict[str, tuple[torch.Tensor, torch.Tensor]]  # own-basis modules: (U [d_out, r], V [r, d_in])
    untrained: list[str]  # modules where the new adapter has no basis (zero Σ, frozen)
    choice: dict[str, Any]


def _given_clusters(
    config: JDLoraConfig, layers: Mapping[str, JDLoraLayer], bundle: str, own: set[str], cluster: Union[int, str]
) -> dict[str, int]:
    """Clusters per shared-basis module for `cluster=<id>` or `cluster=<adapter name>`."""
    out = {}
    if isinstance(cluster, str):
        slot = config.resolve_adapter(cluster)  # KeyError naming the adapter when there is none
        for module in layers:
            if module not in own:
                out[module] = config.clusters_for(module)[slot]
        return out
    if isinstance(cluster, bool) or not isinstance(cluster, int):
        raise TypeError(f"cluster must be 'auto', a cluster id or an adapter name, got {cluster!r}.")
    for module, layer in layers.items():
        if module in own:
            continue
        count = layer.jd_U[bundle].shape[0]
        if _group_of(config, module) == _DEFAULT_GROUP:
            if not 0 <= cluster < count:
                raise TrainingSetupError(f"cluster={cluster}: the bundle has {count} clusters (ids 0 to {count - 1}).")
            out[module] = cluster
        elif count == 1:
            out[module] = 0
        else:
            raise TrainingSetupError(
                f"cluster={cluster} is ambiguous: module {module!r} has its own cluster assignment (cluster_pattern "
                f"{_group_of(config, module)!r}, {count} clusters). Pass cluster=<adapter name> to train in that "
                "adapter's clusters at every module, or cluster='auto'."
            )
    return out


def _plan(
    tuner: Any,
    bundle: str,
    name: str,
    layers: Mapping[str, JDLoraLayer],
    own: set[str],
    init: str,
    cluster: Union[int, str],
    probe_batches: Optional[Iterable[Mapping[str, Any]]],
    report: Any,
) -> _Plan:
    config = tuner.peft_config[bundle]
    counts = {m: layer.jd_U[bundle].shape[0] for m, layer in layers.items()}
    shared = [m for m in layers if m not in own]
    if not shared and not init.startswith("project:"):
        raise TrainingSetupError(
            "every module of this bundle stores per-adapter SVD (each adapter has its own basis): there is no shared "
            "basis to train a new adapter in. Train an ordinary LoRA and `jdlora add` it, or start from one with "
            "init='project:<LoRA folder>' (the adapter then gets its own basis, as projection gives it)."
        )
    projected = None
    if init.startswith("project:"):
        projected = _projection(tuner, bundle, name, init.removeprefix("project:"), layers, report)

    if cluster == "auto":
        if all(counts[m] == 1 for m in shared):
            clusters, choice = {m: 0 for m in shared}, {"method": "single cluster"}
        elif projected is not None:
            clusters = {m: projected["clusters"][m] for m in shared}
            choice = {"method": "projection error"}
        else:
            if probe_batches is None:
                raise TrainingSetupError(
                    "the bundle has several clusters: pass probe_batches=[...] (a few batches of the new task, with "
                    "labels) so that cluster='auto' can choose one, or choose it with cluster=<id or adapter name>."
                )
            start = time.perf_counter()
            scores = cluster_scores(tuner, probe_batches, bundle)
            clusters = {}
            for module in shared:
                group = scores.get(_group_of(config, module))
                clusters[module] = group["best"] if group is not None else 0
            choice = {
                "method": "gradient",
                "scores": {g: s["scores"] for g, s in scores.items()},
                "seconds": round(time.perf_counter() - start, 3),
            }
    else:
        clusters = _given_clusters(config, layers, bundle, own, cluster)
        choice = {"method": "given", "cluster": cluster}

    sigma: dict[str, torch.Tensor] = {}
    new_bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    untrained: list[str] = []
    for module, layer in layers.items():
        r, diag = layer.r[bundle], layer.sigma_type[bundle] == "diag"
        zeros = torch.zeros((r,) if diag else (r, r))
        if module in own:
            clusters[module] = counts[module]  # a singleton cluster of its own, appended
            if projected is not None and module in projected["bases"]:
                new_bases[module] = projected["bases"][module]
                sigma[module] = projected["sigma"][module].float()
            else:
                untrained.append(module)
                d_out, d_in = layer.out_features, layer.in_features
                new_bases[module] = (torch.zeros(d_out, r), torch.zeros(r, d_in))
                sigma[module] = zeros
            continue
        c = clusters[module]
        if init == "zeros":
            sigma[module] = zeros
        elif init == "mean":
            members = [i for i, k in enumerate(config.clusters_for(module)) if k == c]
            held = layer.jd_sigma[bundle].detach()
            sigma[module] = held[members].float().mean(0).cpu() if members else zeros
        else:
            if projected["clusters"].get(module) == c:
                sigma[module] = projected["sigma"][module].float()
            elif module in projected["factors"]:  # a cluster other than the projection's choice was asked for
                A, B = projected["factors"][module]
                U, V = layer.jd_U[bundle][c].detach().cpu(), layer.jd_V[bundle][c].detach().cpu()
                sigma[module] = _least_squares_core(U, V, A, B, diag).float()
            else:
                sigma[module] = zeros  # the LoRA lacks the module
    default_modules = [m for m in layers if _group_of(config, m) == _DEFAULT_GROUP]
    choice["default_cluster"] = clusters[default_modules[0]] if default_modules else 0
    return _Plan(clusters=clusters, sigma=sigma, new_bases=new_bases, untrained=untrained, choice=choice)


def _projection(
    tuner: Any, bundle: str, name: str, folder: str, layers: Mapping[str, JDLoraLayer], report: Any
) -> dict[str, Any]:
    """The projection of the LoRA at `folder` into the bundle's bases, as `jdlora add` computes it."""
    from .compression import project, read_lora_adapter

    if not folder:
        raise TrainingSetupError(
            "init='project:<LoRA folder>' needs the folder of a PEFT LoRA adapter after 'project:'."
        )
    adapter = read_lora_adapter(folder, name=name)  # AdapterReadError naming the folder
    config = tuner.peft_config[bundle]
    view = Bundle(
        config=config,
        modules={
            m: ModuleFactors(layer.jd_U[bundle].detach(), layer.jd_V[bundle].detach(), layer.jd_sigma[bundle].detach())
            for m, layer in layers.items()
        },
        report=copy.deepcopy(report),
    )
    projected = project(view, [adapter], progress=False)
    out: dict[str, Any] = {"clusters": {}, "sigma": {}, "bases": {}, "factors": {}}
    for module, factors in projected.modules.items():
        out["clusters"][module] = projected.config.clusters_for(module)[-1]
        out["sigma"][module] = factors.sigma[-1].detach().cpu()
        if factors.U.shape[0] > view.modules[module].U.shape[0]:  # own-basis module: the LoRA's own SVD basis
            out["bases"][module] = (factors.U[-1].detach().cpu().float(), factors.V[-1].detach().cpu().float())
        if module in adapter.modules:
            out["factors"][module] = adapter.modules[module]
    return out


# ---------------------------------------------------------------------------------------------------- adding


def add_trainable_adapter(
    model: nn.Module,
    name: str,
    init: str = "zeros",
    cluster: Union[int, str] = "auto",
    *,
    probe_batches: Optional[Iterable[Mapping[str, Any]]] = None,
    bundle: Optional[str] = None,
    make_default: bool = True,
    stop_on_nonfinite_loss: bool = True,
) -> TrainableAdapter:
    """Add adapter `name` to a bundle loaded with `is_trainable=True`; only its Σ requires grad afterwards.

    Args:
        model: a `PeftModel` holding the bundle (loaded with `PeftModel.from_pretrained(..., is_trainable=True)`).
        name: the new adapter's name; it must not be in the bundle yet.
        init: "zeros", "mean" or "project:<LoRA folder>" (see the module docstring for the trade-offs).
        cluster: "auto", a cluster id, or the name of an adapter of the bundle whose clusters to share.
        probe_batches: a few batches of the new task (model inputs with labels), for cluster="auto" with several
            clusters and no LoRA to project.
        bundle: the PEFT adapter name of the bundle (the active one by default).
        make_default: make the new adapter the bundle's default, so that rows given no `adapter_ids` train it
            (the saved bundle keeps its own default adapter).
        stop_on_nonfinite_loss: raise `NonFiniteLossError` as soon as a training forward returns a NaN or infinite
            loss (nothing is saved by then).

    Returns the `TrainableAdapter` (its `parameters()` are what an optimizer needs; `model.parameters()` filtered
    by `requires_grad` gives the same). `model.save_pretrained(dir)` then writes the bundle with the adapter appended.
    """
    tuner = _tuner_of(model)
    bundle = tuner._bundle_name(bundle)
    config: JDLoraConfig = tuner.peft_config[bundle]
    if config.inference_mode:
        raise TrainingSetupError(
            f"bundle {bundle!r} was loaded for inference: load it with PeftModel.from_pretrained(base, bundle, "
            "is_trainable=True) to train a new adapter in its basis."
        )
    if not isinstance(name, str) or not name:
        raise TrainingSetupError(f"the new adapter's name must be a non-empty string, got {name!r}.")
    if name in config.adapter_names:
        raise TrainingSetupError(
            f"the bundle already holds an adapter named {name!r} (index {config.adapter_names.index(name)}): choose "
            "another name, or remove that adapter first (`jdlora remove`)."
        )
    states: dict[str, TrainableAdapter] = tuner.__dict__.setdefault(STATE_ATTR, {})
    if bundle in states:
        raise TrainingSetupError(
            f"bundle {bundle!r} is already training adapter {states[bundle].name!r}: save it (model.save_pretrained) "
            "and load the saved bundle to train another."
        )
    if not isinstance(init, str) or not (init in ("zeros", "mean") or init.startswith("project:")):
        raise TrainingSetupError(f"init must be one of {INIT_CHOICES}, got {init!r}.")
    layers = _bundle_layers(tuner, bundle)
    if not layers:
        raise TrainingSetupError(f"bundle {bundle!r} patches no layer of this model.")
    merged = [m for m, layer in layers.items() if layer.merged]
    if merged:
        raise TrainingSetupError(
            f"an adapter of the bundle is merged into the base weights ({merged[0]}): unmerge it first."
        )

    loaded_from = getattr(config, "_loaded_from", None)
    source = _source_files(loaded_from)
    report = source.report
    own = _own_basis_modules(config, layers, bundle, report)
    plan = _plan(tuner, bundle, name, layers, own, init, cluster, probe_batches, report)
    _check_one_cluster_per_group(config, plan)
    slot = config.num_adapters
    state = TrainableAdapter(
        name=name,
        bundle=bundle,
        slot=slot,
        init=init,
        clusters=plan.clusters,
        cluster_choice=plan.choice,
        sigma={},
        untrained_modules=plan.untrained,
        original_default=config.default_adapter,
        storage_dtype=source.dtype,
        source_report=report,
        loaded_from=loaded_from,
        target_modules=source.target_modules if source.target_modules is not None else sorted(layers),
    )
    _append_to_config(config, name, layers, plan, state)
    for module, layer in layers.items():
        _append_to_layer(layer, bundle, config.clusters_for(module), plan, module, state)
    for param in model.parameters():
        param.requires_grad_(False)
    for module, param in state.sigma.items():
        param.requires_grad_(module not in plan.untrained)
    state.fingerprints = _frozen_fingerprints(layers, bundle)
    states[bundle] = state
    if make_default:
        tuner.set_default_adapter(name, bundle)
    _install_hooks(tuner, state, stop_on_nonfinite_loss)
    if hasattr(model, "base_model") and model is not tuner:
        # PEFT's save_pretrained would write this layer's extra Σ as an unknown tensor: save the bundle instead.
        object.__setattr__(model, "save_pretrained", types.MethodType(_save_pretrained, model))
    if plan.untrained:
        warnings.warn(
            f"{len(plan.untrained)} of {len(layers)} modules store per-adapter SVD bases (e.g. {plan.untrained[0]!r}): "
            f"adapter {name!r} has no basis there and is trained in the other {len(layers) - len(plan.untrained)} "
            "modules only (init='project:<LoRA folder>' gives it its own basis there).",
            stacklevel=2,
        )
    return state


def _check_one_cluster_per_group(config: JDLoraConfig, plan: _Plan) -> None:
    """Modules that share one cluster assignment in the config must get one cluster (the config stores one)."""
    seen: dict[str, tuple[str, int]] = {}
    for module, c in plan.clusters.items():
        group = _group_of(config, module)
        first = seen.setdefault(group, (module, c))
        if first[1] != c:
            raise TrainingSetupError(
                f"modules {first[0]!r} and {module!r} share one cluster assignment ({group!r}) but would put the new "
                f"adapter in clusters {first[1]} and {c} (one stores per-adapter SVD, the other a shared basis?): "
                "this bundle's layout cannot take a new adapter in its basis."
            )


def _append_to_config(
    config: JDLoraConfig, name: str, layers: Mapping[str, JDLoraLayer], plan: _Plan, state: TrainableAdapter
) -> None:
    n = config.num_adapters
    default_modules = [m for m in layers if _group_of(config, m) == _DEFAULT_GROUP]
    clusters = list(config.adapter_clusters or [0] * n)
    new_default = plan.clusters[default_modules[0]] if default_modules else 0
    pattern = {key: list(a) for key, a in config.cluster_pattern.items()}
    for key in pattern:
        members = [m for m in layers if _pattern_key(config, m) == key]
        pattern[key].append(plan.clusters[members[0]] if members else 0)
    sources = list(config.adapter_sources) or [{} for _ in range(n)]
    changes = {
        "adapter_names": [*config.adapter_names, name],
        "adapter_clusters": [*clusters, new_default],
        "num_clusters": max(config.num_clusters, new_default + 1),
        "cluster_pattern": pattern,
        "adapter_sources": [*sources, state.source_entry()],
    }
    _copy_config(config, **changes)  # BundleFormatError before the live config changes
    for key, value in changes.items():
        setattr(config, key, value)


def _append_to_layer(
    layer: JDLoraLayer, bundle: str, clusters: list[int], plan: _Plan, module: str, state: TrainableAdapter
) -> None:
    U = layer.jd_U[bundle]
    device = U.device
    if module in plan.new_bases:  # a singleton cluster of its own: the LoRA's SVD basis, or zeros
        U_new, V_new = plan.new_bases[module]
        V = layer.jd_V[bundle]
        layer.jd_U[bundle] = nn.Parameter(torch.cat([U.detach(), U_new.to(device, U.dtype)[None]]), requires_grad=False)
        layer.jd_V[bundle] = nn.Parameter(torch.cat([V.detach(), V_new.to(device, V.dtype)[None]]), requires_grad=False)
    if clusters[-1] != plan.clusters[module]:
        raise RuntimeError(f"module {module!r}: cluster {clusters[-1]} in the config, {plan.clusters[module]} planned.")
    layer.jd_cluster[bundle] = torch.tensor(clusters, dtype=torch.int64, device=device)
    layer.jd_cluster_table[bundle] = ClusterTable.of(clusters)
    param = nn.Parameter(plan.sigma[module].to(device=device, dtype=torch.float32).contiguous())
    layer.jd_sigma_trained[bundle] = param
    state.sigma[module] = param


def _install_hooks(tuner: Any, state: TrainableAdapter, stop_on_nonfinite_loss: bool) -> None:
    """Count the optimizer steps that update the adapter, hash its training batches, stop on a non-finite loss."""
    ref = weakref.ref(state)
    watched = {id(p) for p in state.parameters()}

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        current = ref()
        if current is None:
            return
        for group in optimizer.param_groups:
            if any(id(p) in watched and p.grad is not None for p in group["params"]):
                current.steps += 1
                return

    def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        current = ref()
        if current is None or not (module.training and torch.is_grad_enabled()):
            return
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if not isinstance(ids, torch.Tensor):
            return
        current.batches += 1
        current.tokens += ids.numel()
        current._stream_hash.update(ids.detach().to("cpu", torch.int64).numpy().tobytes())
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor):
            current._stream_hash.update(labels.detach().to("cpu", torch.int64).numpy().tobytes())

    def after_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        current = ref()
        if current is None or not (module.training and torch.is_grad_enabled()):
            return
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} on batch {current.batches} (after {current.steps} optimizer "
                f"steps) of adapter {current.name!r}: training diverged (learning rate too high, fp16 overflow?) or "
                "the batch has no label token (all -100). Stopped: nothing was saved."
            )

    state._hooks.append(register_optimizer_step_post_hook(after_step))
    state._hooks.append(tuner.model.register_forward_pre_hook(before_forward, with_kwargs=True))
    if stop_on_nonfinite_loss:
        state._hooks.append(tuner.model.register_forward_hook(after_forward, with_kwargs=True))
    # The optimizer hook is global: it must not outlive the model (`close()` removes the hooks sooner).
    weakref.finalize(state, _remove_hooks, list(state._hooks))


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------------------------------------- checkpointing


class _RoutingReplay:
    """`context_fn` for torch.utils.checkpoint: the layers recomputed in backward run under the routing of the call
    that ran them forward (that call has ended by then), so rows keep their adapters."""

    def __init__(self, router: AdapterRouter) -> None:
        self.router = router

    def __call__(self) -> tuple[Any, Any]:
        call = self.router.current()
        return contextlib.nullcontext(), (self.router.routing(call) if call is not None else contextlib.nullcontext())


def enable_activation_checkpointing(model: nn.Module, every_n_layers: int = 1) -> None:
    """Activation (gradient) checkpointing that keeps `adapter_ids` working in training batches.

    transformers' `gradient_checkpointing_enable()` works too as long as batches carry no `adapter_ids` (rows then
    use the default adapter, which the recomputation also sees); with per-row ids, call this instead (and leave
    `TrainingArguments.gradient_checkpointing` off): the recomputed layers replay each call's routing.
    """
    tuner = _tuner_of(model)
    inner = tuner.model
    kwargs = {"use_reentrant": False, "context_fn": _RoutingReplay(tuner.jd_router)}
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:  # older transformers
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    setattr(tuner.jd_router, REPLAY_ATTR, True)


# ---------------------------------------------------------------------------------------------------- saving


def _save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
    """`PeftModel.save_pretrained` of a model training an adapter in its bundle's basis (the Trainer calls it too)."""
    if not kwargs.get("is_main_process", True):
        return
    save_trained_bundle(model, save_directory, overwrite=bool(kwargs.get("overwrite", False)))


def trained_bundle(model: nn.Module, bundle: Optional[str] = None) -> Bundle:
    """The bundle with the trained adapter appended, in memory (config, tensors, report), checked: every frozen
    tensor bit-identical to what it was when the adapter was added, every value finite."""
    tuner = _tuner_of(model)
    bundle = tuner._bundle_name(bundle)
    state = tuner.__dict__.get(STATE_ATTR, {}).get(bundle)
    if state is None:
        raise TrainingSetupError(f"bundle {bundle!r} is training no adapter: call add_trainable_adapter first.")
    layers = _bundle_layers(tuner, bundle)
    now = _frozen_fingerprints(layers, bundle)
    changed = [key for key, digest in now.items() if state.fingerprints.get(key) != digest]
    if changed:
        raise RuntimeError(
            f"{len(changed)} frozen tensors of the bundle changed since add_trainable_adapter, e.g. {changed[0]!r}: "
            "something trained or modified them (PEFT's set_adapter() makes a whole bundle trainable again). The new "
            f"adapter {state.name!r} was trained against other bases than the bundle's; nothing was written."
        )
    diverged = state.nonfinite_module()
    if diverged is not None:
        raise NonFiniteLossError(
            f"adapter {state.name!r}: its Σ at module {diverged!r} holds NaN or inf values (training diverged); "
            "nothing was written."
        )
    config = tuner.peft_config[bundle]
    out_config = _copy_config(
        config,
        inference_mode=True,
        default_adapter=state.original_default,
        target_modules=state.target_modules,
        adapter_sources=[*config.adapter_sources[:-1], state.source_entry()],
    )
    modules = {}
    for module, layer in layers.items():
        U, V, held = layer.jd_U[bundle].detach(), layer.jd_V[bundle].detach(), layer.jd_sigma[bundle].detach()
        dtype = state.storage_dtype or held.dtype
        sigma = torch.cat([held.to(dtype), state.sigma[module].detach().to(held.device, dtype)[None]])
        modules[module] = ModuleFactors(U.to("cpu", dtype), V.to("cpu", dtype), sigma.to("cpu"))
    result = Bundle(config=out_config, modules=modules, report=None)
    _updated_report(state, result)
    return result


def _updated_report(state: TrainableAdapter, bundle: Bundle) -> BundleReport:
    """The source bundle's report with the trained adapter added (per adapter, overall, sizes); a report of the new
    adapter alone when the source had none."""
    from .compression.api import _refresh_size
    from .compression.metrics import dtype_bytes

    had_report = state.source_report is not None
    report = copy.deepcopy(state.source_report) if had_report else BundleReport()
    report.per_adapter[state.name] = AdapterReport(
        mean_error=0.0,  # the bundle holds the trained adapter exactly: there was no compression
        max_error=0.0,
        cluster=state.cluster_choice.get("default_cluster", 0),
        params=state.num_trainable_params,
        trained_in_basis={k: v for k, v in state.source_entry().items() if k not in ("source", "type")},
    )
    report.trained_in_basis = [*report.trained_in_basis, state.name]
    report.num_adapters, report.num_clusters = bundle.config.num_adapters, bundle.config.num_clusters
    bundle.report = report
    if had_report and all(entry.mean_error is not None for entry in report.per_adapter.values()):
        report.refresh_overall()
        dtype = next(iter(bundle.modules.values())).sigma.dtype
        _refresh_size(bundle, original_added=state.num_trainable_params * dtype_bytes(dtype))
    return report


def trained_card(bundle: Bundle, state: TrainableAdapter, title: str) -> str:
    """The bundle's model card (as the Hub tools write it) with a section on the adapter trained in its basis."""
    from jdlora_hub.card import bundle_card

    card = bundle_card(bundle.config, bundle.report, title=title)
    entry = state.source_entry()
    data = entry.get("file") or entry["data_hash_of"]
    lines = [
        "",
        "## Trained in the bundle's basis",
        "",
        f"Adapter `{state.name}` was trained inside this bundle's shared bases: only its Σ learned "
        f"({state.num_trainable_params:,} numbers), the bases and the other adapters are bit-identical to the bundle "
        "it was trained from, so it has no compression error.",
        "",
        "| adapter | init | cluster | steps | trainable numbers | data | data sha256 |",
        "|---|---|---:|---:|---:|---|---|",
        f"| {state.name} | {entry['init']} | {entry['cluster']} | {entry['steps']} | {entry['trainable_params']:,} | "
        f"{str(data).replace('|', '/')} | {entry['data_sha256'][:16]} |",
        "",
    ]
    return card.rstrip("\n") + "\n" + "\n".join(lines)


def _has_bundle_files(folder: Path) -> list[str]:
    return [name for name in BUNDLE_FILES if (folder / name).exists()]


def save_trained_bundle(
    model: nn.Module, output_dir: Union[str, os.PathLike], overwrite: bool = False, bundle: Optional[str] = None
) -> Path:
    """Write the bundle with the trained adapter appended: config (adapter_names, adapter_clusters, cluster_pattern,
    adapter_sources), weights, report and model card; verified by reading it back, then moved into place atomically.

    A new `output_dir` appears complete or not at all. An existing folder receives the bundle's four files (other
    files there stay); if it holds bundle files already, they are replaced only with `overwrite=True`.
    """
    from jdlora_hub.output import staged_bundle_update

    tuner = _tuner_of(model)
    bundle_name = tuner._bundle_name(bundle)
    state = tuner.__dict__.get(STATE_ATTR, {}).get(bundle_name)
    target = Path(output_dir)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; the bundle was not written.")
    existing = _has_bundle_files(target) if target.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{target} already holds {', '.join(existing)}: pass overwrite=True to replace them (other files stay)."
        )
    result = trained_bundle(model, bundle_name)
    card = trained_card(result, state, title=target.resolve().name)
    destination = staged_bundle_update(target) if target.is_dir() else atomic_output_dir(target)
    with destination as tmp:
        write_bundle_files(result, tmp)
        (tmp / CARD_NAME).write_text(card)
        _check_written(result, tmp)
    return target


def _check_written(bundle: Bundle, folder: Path) -> None:
    from .bundle import load_bundle

    loaded = load_bundle(folder)
    if loaded.config.adapter_names != bundle.config.adapter_names:
        raise RuntimeError(f"{folder}: the written bundle reads back with other adapter names.")
    for module, factors in bundle.modules.items():
        back = loaded.modules[module]
        for part in ("U", "V", "sigma"):
            if not torch.equal(getattr(factors, part), getattr(back, part)):
                raise RuntimeError(f"{folder}: the written bundle reads back with another {part} at {module!r}.")


__all__ = [
    "INIT_CHOICES",
    "TRAINED_SOURCE",
    "NonFiniteLossError",
    "TrainableAdapter",
    "add_trainable_adapter",
    "cluster_scores",
    "enable_activation_checkpointing",
    "save_trained_bundle",
    "trainable_adapter",
    "trained_bundle",
]
