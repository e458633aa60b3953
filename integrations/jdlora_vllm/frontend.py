"""The plugin in vLLM's front end: requests are checked before they reach the engine, and the OpenAI server
serves every bundle adapter by name.

- `InputProcessor._validate_lora` (every `LLM.generate` / server request) also checks a request that names a bundle:
  the adapter exists (else a `VLLMValidationError` for that request, not an engine error), a name that several
  configured bundles hold is served as "<bundle>/<adapter>", one `lora_int_id` never names two adapters, and the
  ordinary LoRAs that need a pool entry in a layer a bundle patches (also through a module vLLM packs with the
  bundle's into that layer: k_proj next to q_proj in qkv_proj) fit `plain_lora_slots`.
- `OpenAIServingModels.init_static_loras` also registers every bundle adapter under its served names, so
  `"model": "<adapter name>"` works and `/v1/models` lists them, without `VLLM_ALLOW_RUNTIME_LORA_UPDATING`.
- `BundleAdapterResolver` (registered as the LoRA resolver "jdlora") answers the same names when runtime LoRA
  updating is on.
- `EngineArgs.create_engine_config`: without `--lora-target-modules`, vLLM's own LoRA wrappers are limited to the
  modules the bundles patch (every other module kept its LoRA wrapper, stacks and per-step work for nothing: on CPU
  that halved the throughput of every request, base rows included). An ordinary LoRA that patches another module is
  then refused by name instead of being served without it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from .catalog import AdapterRef, BundleCatalog, UnknownAdapterError, is_bundle_folder
from .settings import JDVllmSettings

logger = init_logger("vllm.jdlora")


class FrontendState:
    """What one front end knows of the configured bundles and of the ids its requests used."""

    def __init__(
        self,
        settings: JDVllmSettings,
        catalog: BundleCatalog,
        limited_targets: Optional[list[str]] = None,
        packed_modules_mapping: Optional[Callable[[], dict[str, list[str]]]] = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        # vLLM's LoRA wrappers were limited to these module names (no --lora-target-modules given), or None.
        self.limited_targets = limited_targets
        self._lock = threading.Lock()
        self._id_owner: dict[int, tuple] = {}  # lora_int_id -> ("bundle", b, a) | ("lora", path)
        self._pooled_loras: set[int] = set()
        self._bundle_suffixes = {
            module.rpartition(".")[2] for b in catalog.bundles for module in _target_list(b.config.target_modules)
        }
        # Called at the first ordinary LoRA only: it imports the model's class, which bundle-only engines never need.
        self._packed_modules_mapping = packed_modules_mapping or (lambda: dict(COMMON_PACKED_MODULES))
        self._pool_suffixes: Optional[frozenset[str]] = None

    def check(self, lora_request: LoRARequest) -> None:
        """Check (and, for an ambiguous adapter name, qualify) one request; raises `VLLMValidationError`."""
        try:
            ref = self.catalog.lookup(lora_request.lora_name, lora_request.lora_path)
        except UnknownAdapterError as err:
            raise VLLMValidationError(str(err), parameter="lora_request", value=lora_request.lora_name) from None
        if ref is not None:
            if self.catalog.is_ambiguous(lora_request.lora_name):
                # LoRARequest equality is by name: two bundles' "task_a" in one step must not collapse into one.
                lora_request.lora_name = self.catalog.qualified_name(ref)
            self._bind(lora_request, ("bundle", ref.bundle, ref.adapter))
            return
        if is_bundle_folder(lora_request.lora_path):
            configured = [b.spec.source for b in self.catalog.bundles]
            raise VLLMValidationError(
                f"LoRA request {lora_request.lora_name!r} points at the JD-LoRA bundle {lora_request.lora_path!r}, "
                f"which is not among the configured bundles {configured}.",
                parameter="lora_request",
                value=lora_request.lora_path,
            )
        self._bind(lora_request, ("lora", lora_request.lora_path))
        self._check_targets_are_wrapped(lora_request)
        if self._needs_pool_entry(lora_request.lora_path):
            with self._lock:
                pooled = self._pooled_loras | {lora_request.lora_int_id}
                if len(pooled) > self.settings.plain_lora_slots:
                    raise VLLMValidationError(
                        f"ordinary LoRA {lora_request.lora_name!r} patches a layer that a JD-LoRA bundle patches (a "
                        "module of it, or one vLLM packs with it, as k_proj with q_proj), and this engine serves at "
                        f"most jdlora.plain_lora_slots={self.settings.plain_lora_slots} such LoRAs over its life: "
                        "raise plain_lora_slots in additional_config['jdlora'].",
                        parameter="lora_request",
                        value=lora_request.lora_name,
                    )
                self._pooled_loras = pooled

    def _bind(self, lora_request: LoRARequest, owner: tuple) -> None:
        with self._lock:
            previous = self._id_owner.setdefault(lora_request.lora_int_id, owner)
        if previous != owner:
            raise VLLMValidationError(
                f"lora_int_id {lora_request.lora_int_id} already names another adapter ({_describe(previous)}); "
                f"give {lora_request.lora_name!r} its own id: vLLM keys loaded adapters by id.",
                parameter="lora_request",
                value=lora_request.lora_int_id,
            )

    def _needs_pool_entry(self, lora_path: str) -> bool:
        """Whether an ordinary LoRA may patch a layer a bundle patches (True unless its config says otherwise)."""
        targets = _lora_targets(lora_path)
        if targets is None:  # a regex, or unreadable: assume it may
            return True
        if self._pool_suffixes is None:
            self._pool_suffixes = modules_in_bundle_layers(self._bundle_suffixes, self._packed_modules_mapping())
        return not self._pool_suffixes.isdisjoint(targets)

    def _check_targets_are_wrapped(self, lora_request: LoRARequest) -> None:
        if self.limited_targets is None:
            return
        targets = _lora_targets(lora_request.lora_path)
        outside = sorted(set(targets or ()) - set(self.limited_targets))
        if targets is None or outside:
            what = f"patches {outside}" if outside else "has target modules the front end cannot read"
            raise VLLMValidationError(
                f"ordinary LoRA {lora_request.lora_name!r} {what}, but this engine wraps only the modules its JD-LoRA "
                f"bundles patch ({self.limited_targets}): start it with --lora-target-modules listing every module "
                "your LoRAs patch.",
                parameter="lora_request",
                value=lora_request.lora_name,
            )

    def served_requests(self, next_id: Any, base_model_name: Optional[str]) -> dict[str, LoRARequest]:
        """A `LoRARequest` for every served name of every bundle adapter, ids from `next_id()`."""
        requests = {}
        for name, ref in self.catalog.served_names():
            request = LoRARequest(
                lora_name=name,
                lora_int_id=next_id(),
                lora_path=self.catalog.bundles[ref.bundle].spec.source,
                base_model_name=base_model_name,
            )
            self._bind(request, ("bundle", ref.bundle, ref.adapter))
            requests[name] = request
        return requests


def _lora_targets(lora_path: str) -> Optional[list[str]]:
    """Module names (last components) an ordinary LoRA folder patches, or None when they cannot be read as a list."""
    config_file = Path(lora_path) / "adapter_config.json"
    try:
        targets = json.loads(config_file.read_text()).get("target_modules")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return None
    return sorted({t.rpartition(".")[2] for t in targets})


COMMON_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def modules_in_bundle_layers(bundle_suffixes: set[str], packed_modules_mapping: dict[str, list[str]]) -> frozenset[str]:
    """Module names (last components) whose LoRA lands in a layer that a bundle patches, so in its JD layer's
    ordinary-LoRA pool: the bundles' modules, the modules packed with one of them into one vLLM layer (k_proj next
    to a bundle's q_proj in `qkv_proj`, up_proj next to gate_proj in `gate_up_proj`), and those packed layers'
    own names (a LoRA saved with fused names)."""
    names = set(bundle_suffixes)
    for packed, members in packed_modules_mapping.items():
        if packed in bundle_suffixes or not bundle_suffixes.isdisjoint(members):
            names.update(members)
            names.add(packed)
    return frozenset(names)


def served_packed_modules(vllm_config: Any) -> dict[str, list[str]]:
    """The served model's `packed_modules_mapping` (what vLLM's LoRA manager packs), from its model class."""
    try:
        from vllm.model_executor.model_loader import get_model_cls

        model_cls = get_model_cls(vllm_config.model_config)
    except Exception as err:  # the engine reports a model it cannot load; the check stays on the common layouts
        logger.warning("jdlora: cannot resolve the model class (%s); assuming Llama's packed modules.", err)
        return dict(COMMON_PACKED_MODULES)
    mapping = getattr(model_cls, "packed_modules_mapping", None)
    # a model class that defines none (a wrapper whose parts define theirs): the packings vLLM's models use
    return {key: list(value) for key, value in mapping.items()} if mapping else dict(COMMON_PACKED_MODULES)


def _describe(owner: tuple) -> str:
    return f"bundle adapter {owner[1]}:{owner[2]}" if owner[0] == "bundle" else f"the LoRA at {owner[1]!r}"


def _target_list(target_modules: Any) -> list[str]:
    return list(target_modules) if isinstance(target_modules, (list, tuple, set)) else []


_states: dict[int, Optional[FrontendState]] = {}
_limited_targets: dict[int, list[str]] = {}  # id(vllm_config) -> the LoRA target modules this plugin chose
_states_lock = threading.Lock()


def frontend_state(vllm_config: Any) -> Optional[FrontendState]:
    """The front end's state for an engine config (parsed and opened once), or None without a jdlora entry."""
    key = id(vllm_config)
    with _states_lock:
        if key not in _states:
            settings = JDVllmSettings.from_additional_config(getattr(vllm_config, "additional_config", None))
            _states[key] = (
                None
                if settings is None
                else FrontendState(
                    settings,
                    BundleCatalog.open(settings),
                    _limited_targets.get(key),
                    lambda: served_packed_modules(vllm_config),
                )
            )
        return _states[key]


def bundle_target_modules(catalog: BundleCatalog) -> Optional[list[str]]:
    """The module names (last components, e.g. q_proj) the configured bundles patch, or None when a bundle gives
    its targets as a regex."""
    names = set()
    for bundle in catalog.bundles:
        targets = bundle.config.target_modules
        if not isinstance(targets, (list, tuple, set)):
            return None
        names.update(t.rpartition(".")[2] for t in targets)
    return sorted(names)


def limit_lora_wrappers_to_bundles(vllm_config: Any) -> None:
    """Without --lora-target-modules, let vLLM wrap only the modules the bundles patch (see the module docstring)."""
    lora_config = getattr(vllm_config, "lora_config", None)
    settings = JDVllmSettings.from_additional_config(getattr(vllm_config, "additional_config", None))
    if settings is None or lora_config is None or lora_config.target_modules is not None:
        return
    targets = bundle_target_modules(BundleCatalog.open(settings))
    if targets is None:
        return
    lora_config.target_modules = targets
    with _states_lock:
        _limited_targets[id(vllm_config)] = targets
    logger.info("jdlora: vLLM's LoRA layers limited to the bundles' modules %s (no --lora-target-modules).", targets)


# ---------------------------------------------------------------------------- patches installed by register()


def validate_lora_with_bundles(original: Any) -> Any:
    def _validate_lora(self: Any, lora_request: Optional[LoRARequest]) -> None:
        original(self, lora_request)
        if lora_request is None:
            return
        state = frontend_state(self.vllm_config)
        if state is not None:
            state.check(lora_request)

    _validate_lora._jdlora_wrapped = True
    return _validate_lora


def create_engine_config_with_bundles(original: Any) -> Any:
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = original(self, *args, **kwargs)
        limit_lora_wrappers_to_bundles(vllm_config)
        return vllm_config

    create_engine_config._jdlora_wrapped = True
    return create_engine_config


def init_static_loras_with_bundles(original: Any) -> Any:
    async def init_static_loras(self: Any) -> None:
        await original(self)
        state = frontend_state(self.engine_client.vllm_config)
        if state is None:
            return
        for request in self.lora_requests.values():  # --lora-modules reach the engine without request checks
            state.check(request)
        requests = state.served_requests(lambda: self.lora_id_counter.inc(1), self.base_model_paths[0].name)
        taken = sorted(set(requests) & set(self.lora_requests))
        if taken:
            raise ValueError(
                f"--lora-modules names {taken} are also adapter names of the configured JD-LoRA bundles: rename them."
            )
        self.lora_requests.update(requests)
        global _server_catalog
        _server_catalog = state
        logger.info("jdlora: the server serves %d bundle adapter names.", len(requests))

    init_static_loras._jdlora_wrapped = True
    return init_static_loras


_server_catalog: Optional[FrontendState] = None


class BundleAdapterResolver(LoRAResolver):
    """Resolves `"model": "<adapter>"` or `"<bundle>/<adapter>"` to the bundle adapter (runtime LoRA updating)."""

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        state = _server_catalog
        if state is None:
            return None
        try:
            ref: AdapterRef = state.catalog.resolve_name(lora_name)
        except UnknownAdapterError:
            return None
        return LoRARequest(
            lora_name=lora_name,
            lora_int_id=1,  # the server replaces it with its own counter
            lora_path=state.catalog.bundles[ref.bundle].spec.source,
            base_model_name=base_model_name,
        )
