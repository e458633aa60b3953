"""The configured bundles and the names their adapters are served under.

A request names a bundle adapter by `LoRARequest(<adapter name>, <id>, <bundle folder or Hub id>)`, or on the
OpenAI server by `"model": "<adapter name>"`. An adapter name that occurs in several configured bundles is served as
`"<bundle name>/<adapter name>"` (the qualified form is accepted for every adapter).

The catalog reads only each bundle's `adapter_config.json` (cheap: the front end needs nothing more); the worker
loads the tensors with `load_factors`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from peft_jdlora.bundle import CONFIG_NAME, WEIGHTS_NAME, Bundle, load_bundle, read_config
from peft_jdlora.config import BundleFormatError, JDLoraConfig

from .settings import BundleSpec, JDLoraVllmConfigError, JDVllmSettings


class UnknownAdapterError(KeyError):
    """A request names a bundle adapter that the configured bundles do not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; these are sentences
        return str(self.args[0])


@dataclass(frozen=True)
class AdapterRef:
    """One adapter of one configured bundle."""

    bundle: int  # index of the bundle in the configured order
    adapter: int  # index of the adapter in its bundle (its row of Σ)


@dataclass
class CatalogBundle:
    index: int
    spec: BundleSpec
    folder: Path
    config: JDLoraConfig
    _index_of: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index_of = {name: i for i, name in enumerate(self.config.adapter_names)}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_adapters(self) -> int:
        return len(self.config.adapter_names)

    def adapter_index(self, adapter_name: str) -> Optional[int]:
        return self._index_of.get(adapter_name)


class BundleCatalog:
    """The bundles named in the plugin settings, in their configured order."""

    def __init__(self, bundles: list[CatalogBundle]) -> None:
        self.bundles = bundles
        self._owners: dict[str, list[AdapterRef]] = {}
        for bundle in bundles:
            for i, adapter_name in enumerate(bundle.config.adapter_names):
                self._owners.setdefault(adapter_name, []).append(AdapterRef(bundle.index, i))

    @classmethod
    def open(cls, settings: JDVllmSettings) -> BundleCatalog:
        """Find every configured bundle (local folder, or Hub repo through the local cache / a download) and read
        its config. Raises `JDLoraVllmConfigError` naming the bundle at fault."""
        bundles = []
        for index, spec in enumerate(settings.bundles):
            folder = _bundle_folder(spec)
            try:
                config = read_config(folder)
            except BundleFormatError as err:
                raise JDLoraVllmConfigError(f"configured bundle {spec.source!r}: {err}") from None
            if not (folder / WEIGHTS_NAME).is_file():
                raise JDLoraVllmConfigError(f"configured bundle {spec.source!r}: {folder} holds no {WEIGHTS_NAME}.")
            bundles.append(CatalogBundle(index=index, spec=spec, folder=folder, config=config))
        return cls(bundles)

    # ------------------------------------------------------------------ names

    def find_bundle(self, lora_path: str) -> Optional[CatalogBundle]:
        """The configured bundle a request's `lora_path` points at (its configured source, its folder, the same
        folder spelled differently, or the bundle's name), or None."""
        if not lora_path:
            return None
        for bundle in self.bundles:
            if lora_path == bundle.spec.source:
                return bundle
        real = _realpath(lora_path)
        for bundle in self.bundles:
            if real is not None and real == _realpath(str(bundle.folder)):
                return bundle
        if real is None:  # not a path on this machine: the bundle's name is accepted as its path too
            for bundle in self.bundles:
                if lora_path == bundle.name:
                    return bundle
        return None

    def lookup(self, lora_name: str, lora_path: str) -> Optional[AdapterRef]:
        """The adapter a `LoRARequest(lora_name, _, lora_path)` asks for, or None when `lora_path` is not a
        configured bundle (an ordinary LoRA). Raises `UnknownAdapterError` for a name the bundle does not hold."""
        bundle = self.find_bundle(lora_path)
        if bundle is None:
            return None
        prefix = bundle.name + "/"
        name = lora_name[len(prefix) :] if lora_name.startswith(prefix) else lora_name
        index = bundle.adapter_index(name)
        if index is None:
            raise UnknownAdapterError(self._unknown_message(lora_name, bundle))
        return AdapterRef(bundle.index, index)

    def resolve_name(self, served_name: str) -> AdapterRef:
        """The adapter served under `served_name` ("<adapter>" when unique, or "<bundle>/<adapter>")."""
        bundle_name, sep, adapter_name = served_name.rpartition("/")
        if sep:
            for bundle in self.bundles:
                if bundle.name == bundle_name:
                    index = bundle.adapter_index(adapter_name)
                    if index is None:
                        raise UnknownAdapterError(self._unknown_message(served_name, bundle))
                    return AdapterRef(bundle.index, index)
        owners = self._owners.get(served_name, [])
        if len(owners) == 1:
            return owners[0]
        if owners:
            choices = [self.qualified_name(ref) for ref in owners]
            raise UnknownAdapterError(
                f"adapter {served_name!r} is in {len(owners)} configured bundles: name one of {choices}."
            )
        raise UnknownAdapterError(self._unknown_message(served_name, None))

    def is_ambiguous(self, adapter_name: str) -> bool:
        return len(self._owners.get(adapter_name, ())) > 1

    def qualified_name(self, ref: AdapterRef) -> str:
        bundle = self.bundles[ref.bundle]
        return f"{bundle.name}/{bundle.config.adapter_names[ref.adapter]}"

    def served_name(self, ref: AdapterRef) -> str:
        """The adapter's plain name when no other configured bundle holds that name, its qualified name otherwise."""
        name = self.bundles[ref.bundle].config.adapter_names[ref.adapter]
        return self.qualified_name(ref) if self.is_ambiguous(name) else name

    def served_names(self) -> Iterator[tuple[str, AdapterRef]]:
        """Every name a request may use: each adapter's served name, and its qualified name when that differs."""
        for bundle in self.bundles:
            for i in range(bundle.num_adapters):
                ref = AdapterRef(bundle.index, i)
                served = self.served_name(ref)
                yield served, ref
                qualified = self.qualified_name(ref)
                if qualified != served:
                    yield qualified, ref

    def _unknown_message(self, name: str, bundle: Optional[CatalogBundle]) -> str:
        pool = bundle.config.adapter_names if bundle is not None else list(self._owners)
        short = name.rpartition("/")[2]
        close = difflib.get_close_matches(short, pool, n=5, cutoff=0.6)
        hint = f" Similar names: {close}." if close else ""
        where = (
            f"bundle {bundle.spec.source!r} ({bundle.num_adapters} adapters)"
            if bundle is not None
            else f"the configured bundles ({', '.join(repr(b.spec.source) for b in self.bundles)})"
        )
        return f"no adapter named {name!r} in {where}.{hint}"

    # ------------------------------------------------------------------ tensors

    def load_factors(self, index: int) -> Bundle:
        """The tensors of bundle `index`, checked against its config (finite values, dtypes, shapes)."""
        bundle = self.bundles[index]
        try:
            return load_bundle(bundle.folder)
        except BundleFormatError as err:
            raise JDLoraVllmConfigError(f"configured bundle {bundle.spec.source!r}: {err}") from None


def is_bundle_folder(path: str) -> bool:
    """Whether a local folder holds a JD-LoRA bundle (its adapter_config.json says peft_type JDLORA)."""
    config_file = Path(path) / CONFIG_NAME
    try:
        return json.loads(config_file.read_text()).get("peft_type") == "JDLORA"
    except (OSError, ValueError, AttributeError):
        return False


def _bundle_folder(spec: BundleSpec) -> Path:
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise JDLoraVllmConfigError(f"configured bundle {spec.source!r} is a file; a bundle is a folder.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(spec.source, revision=spec.revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except HFValidationError:
        raise JDLoraVllmConfigError(
            f"configured bundle {spec.source!r} is neither a local folder nor a Hub repo id."
        ) from None
    except Exception as err:  # network, auth, missing repo or revision: say which bundle and why
        raise JDLoraVllmConfigError(
            f"configured bundle {spec.source!r} could not be fetched from the Hub "
            f"(revision {spec.revision or 'default'}): {type(err).__name__}: {err}"
        ) from None
    return Path(folder)


def _realpath(path: str) -> Optional[str]:
    try:
        return os.path.realpath(os.path.expanduser(path)) if os.path.exists(os.path.expanduser(path)) else None
    except (OSError, ValueError):
        return None
