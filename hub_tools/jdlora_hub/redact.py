"""What a push publishes instead of the paths of the machine that built the bundle.

A bundle folder records where everything came from, for `jdlora add --refit` and for its owner: the absolute folder
of every local source adapter (`adapter_sources`), a local base model (`base_model_name_or_path`), the folder the
logits check ran on (the report). Those paths name users, home folders and project layouts, and mean nothing on the
Hub. A push therefore uploads the config, report and card with every absolute local path replaced by `<local>/NAME`
(NAME: the last component of the path); the local folder keeps the full paths. A local source stays identified by the
sha256 of its weights, which is recorded next to it.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

LOCAL_PREFIX = "<local>/"
_ABSOLUTE_RE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")
NOTE = (
    "Local paths were not published: folders on the machine that built this bundle (local source adapters, a local "
    f"base model) appear as `{LOCAL_PREFIX}NAME`; a local source is identified by the sha256 of its weights in "
    "`adapter_config.json` (`adapter_sources`)."
)


def is_local_path(value: str) -> bool:
    """True for an absolute path (POSIX, Windows or `~`), which only makes sense on the machine that wrote it."""
    return "\n" not in value and bool(_ABSOLUTE_RE.match(value))


def is_redacted(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(LOCAL_PREFIX)


def redacted_path(path: str) -> str:
    """`/home/alice/loras/task-a` -> `<local>/task-a`."""
    pure = PureWindowsPath(path) if re.match(r"^([A-Za-z]:|\\\\)", path) else PurePosixPath(path)
    name = pure.name or path.strip("/\\~")
    return LOCAL_PREFIX + name


def local_paths(data: Any) -> set[str]:
    """Every string in a JSON-like value (dicts, lists) that is an absolute local path."""
    if isinstance(data, dict):
        return set().union(*(local_paths(v) for v in data.values())) if data else set()
    if isinstance(data, (list, tuple)):
        return set().union(*(local_paths(v) for v in data)) if data else set()
    if isinstance(data, str) and is_local_path(data):
        return {data.rstrip("/\\") or data}
    return set()


def redact_text(text: str, paths: set[str]) -> str:
    """`text` with every occurrence of `paths` replaced by its redacted form (longest paths first, so that a path is
    never half replaced by one of its parents)."""
    for path in sorted(paths, key=len, reverse=True):
        if path in text:
            text = text.replace(path, redacted_path(path))
    return text


def redact(data: Any, paths: set[str]) -> Any:
    """A copy of a JSON-like value with the `paths` redacted in every string (keys included)."""
    if isinstance(data, dict):
        return {redact(k, paths): redact(v, paths) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v, paths) for v in data]
    if isinstance(data, str):
        return redact_text(data, paths)
    return data


def publishable(config: dict[str, Any], report: Any, card: str) -> tuple[dict[str, Any], Any, str, list[str]]:
    """(config, report, card, redacted paths): the three texts of a bundle as a push publishes them."""
    paths = local_paths(config) | local_paths(report)
    if not paths:
        return config, report, card, []
    card = redact_text(card, paths)
    if NOTE not in card:
        card = card.rstrip("\n") + "\n\n" + NOTE + "\n"
    return redact(config, paths), redact(report, paths), card, sorted(paths)


def dumps(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
