"""Test support: a local Hugging Face Hub-compatible server (`LocalHub`) and helpers that make real PEFT folders."""

from typing import Any

__all__ = ["LocalHub"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m jdlora_hub.testing.hub_server` does not import the module twice.
    if name == "LocalHub":
        from .hub_server import LocalHub

        return LocalHub
    raise AttributeError(name)
