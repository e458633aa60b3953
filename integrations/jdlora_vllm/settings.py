"""The plugin's settings: the `jdlora` entry of vLLM's `additional_config`.

    vllm serve BASE --enable-lora --max-loras 64 \
        --additional-config '{"jdlora": {"bundles": ["org/jdlora-bundle", "./other-bundle"]}}'

    LLM(model=BASE, enable_lora=True, additional_config={"jdlora": {"bundles": [BUNDLE_DIR]}})

Keys of the `jdlora` entry:

    bundles            list of bundles to serve: a local folder or a Hub repo id each, or an object
                       {"path": ..., "name": ..., "revision": ...} to give the bundle its own name (used in
                       "<name>/<adapter>" when two bundles hold an adapter of the same name) or pin a Hub revision.
    plain_lora_slots   number of ordinary (non-bundle) LoRAs that modules patched by a bundle can hold at once
                       (default 4; 0 when the engine serves bundles only). Each costs one LoRA of rank
                       max_lora_rank on those modules, which is what vLLM would allocate for every one of its
                       `max_loras` slots.

vLLM hands `additional_config` to every process (front end, engine core, tensor-parallel workers), so each one
parses it the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

SETTINGS_KEY = "jdlora"
DEFAULT_PLAIN_LORA_SLOTS = 4
_KEYS = ("bundles", "plain_lora_slots")
_BUNDLE_KEYS = ("path", "name", "revision")


class JDLoraVllmConfigError(ValueError):
    """The `jdlora` entry of `additional_config`, or the engine around it, cannot serve the configured bundles."""


@dataclass(frozen=True)
class BundleSpec:
    """One configured bundle: where it comes from and the name it is served under."""

    source: str  # a local folder or a Hub repo id, as configured
    name: str  # "<name>/<adapter>" addresses an adapter of this bundle
    revision: Optional[str] = None  # Hub revision (branch, tag or commit); None: the default branch


@dataclass(frozen=True)
class JDVllmSettings:
    bundles: tuple[BundleSpec, ...]
    plain_lora_slots: int = DEFAULT_PLAIN_LORA_SLOTS

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> Optional[JDVllmSettings]:
        """The settings in vLLM's `additional_config`, or None when it has no `jdlora` entry (the plugin then
        leaves vLLM exactly as it is). Raises `JDLoraVllmConfigError` naming the key at fault."""
        if isinstance(additional_config, str):
            try:
                additional_config = json.loads(additional_config) if additional_config.strip() else {}
            except json.JSONDecodeError as err:
                raise JDLoraVllmConfigError(f"additional_config is not valid JSON: {err}") from None
        if not isinstance(additional_config, Mapping) or SETTINGS_KEY not in additional_config:
            return None
        entry = additional_config[SETTINGS_KEY]
        if not isinstance(entry, Mapping):
            raise JDLoraVllmConfigError(
                f"additional_config[{SETTINGS_KEY!r}] must be an object such as "
                f'{{"bundles": ["org/jdlora-bundle"]}}, got {type(entry).__name__}.'
            )
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise JDLoraVllmConfigError(
                f"additional_config[{SETTINGS_KEY!r}] has unknown keys {unknown}; known keys: {list(_KEYS)}."
            )
        raw_bundles = entry.get("bundles")
        if not isinstance(raw_bundles, (list, tuple)) or not raw_bundles:
            raise JDLoraVllmConfigError(
                f"additional_config[{SETTINGS_KEY!r}]['bundles'] must be a non-empty list of bundle folders or Hub "
                f"repo ids, got {raw_bundles!r}."
            )
        bundles = tuple(_bundle_spec(item, i) for i, item in enumerate(raw_bundles))
        names = [b.name for b in bundles]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise JDLoraVllmConfigError(
                f"two configured bundles are both named {repeated}: give each its own name with "
                '{"path": ..., "name": ...}.'
            )
        plain = entry.get("plain_lora_slots", DEFAULT_PLAIN_LORA_SLOTS)
        if isinstance(plain, bool) or not isinstance(plain, int) or plain < 0:
            raise JDLoraVllmConfigError(
                f"additional_config[{SETTINGS_KEY!r}]['plain_lora_slots'] must be an integer >= 0, got {plain!r}."
            )
        return cls(bundles=bundles, plain_lora_slots=plain)


def _bundle_spec(item: Any, index: int) -> BundleSpec:
    where = f"additional_config[{SETTINGS_KEY!r}]['bundles'][{index}]"
    if isinstance(item, str):
        source, name, revision = item, None, None
    elif isinstance(item, Mapping):
        unknown = sorted(set(item) - set(_BUNDLE_KEYS))
        if unknown:
            raise JDLoraVllmConfigError(f"{where} has unknown keys {unknown}; known keys: {list(_BUNDLE_KEYS)}.")
        source, name, revision = item.get("path"), item.get("name"), item.get("revision")
        for key, value in (("name", name), ("revision", revision)):
            if value is not None and (not isinstance(value, str) or not value):
                raise JDLoraVllmConfigError(f"{where}[{key!r}] must be a non-empty string, got {value!r}.")
    else:
        raise JDLoraVllmConfigError(f"{where} must be a folder, a Hub repo id or an object, got {item!r}.")
    if not isinstance(source, str) or not source.strip():
        raise JDLoraVllmConfigError(f"{where} needs a bundle folder or Hub repo id, got {source!r}.")
    if name is None:
        name = default_bundle_name(source)
    if "/" in name:
        raise JDLoraVllmConfigError(f"{where}: bundle name {name!r} must not contain '/'.")
    return BundleSpec(source=source, name=name, revision=revision)


def default_bundle_name(source: str) -> str:
    """A bundle's default name: the folder's name, or the repo name of a Hub id ("org/bundle" -> "bundle")."""
    return os.path.basename(os.path.normpath(source)) or source
