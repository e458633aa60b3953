"""The cache folder shared by the demo and the benchmarks, and writes that never leave half a file behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "PEFT_JDLORA_CACHE"


def cache_root() -> Path:
    """Where models, data and adapter collections are cached: $PEFT_JDLORA_CACHE or ~/.cache/peft-jdlora."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft-jdlora")


def replace_dir_atomic(tmp: Path, target: Path) -> None:
    """Move a finished folder into place, so that a crash never leaves a half-written cache entry behind."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared with other users' benchmarks
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON through a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
