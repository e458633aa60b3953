"""Lay out the noarch Hub build of the kernel, build/torch-<backend>/, as kernel-builder's noarch build does.

A pure-Triton kernel has nothing to compile: each build variant is a copy of torch-ext/jdlora_kernels/ with a
metadata.json (name, id, version, license, backend, sha256 digest of the files). kernel-builder (Nix) produces the
same layout; this script needs only Python, so CI and users without Nix can build, test and upload the kernel:

    python kernels/build_noarch.py                       # kernels/build/torch-{cuda,rocm,xpu}/
    python kernels/build_noarch.py --backends cpu --out /tmp/jdk    # CPU variant: runs under TRITON_INTERPRET=1 only

then `kernels.get_local_kernel(Path("kernels/build"))` loads it, and `kernel-builder upload kernels` (or
`huggingface_hub.upload_folder` of build/) publishes it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

KERNEL_ROOT = Path(__file__).resolve().parent
# Backends the `kernels` library resolves noarch variants for; "cpu" is accepted for interpreter testing.
KNOWN_BACKENDS = ("cann", "cpu", "cuda", "metal", "neuron", "rocm", "tpu", "xpu")


def read_build_toml(root: Path = KERNEL_ROOT) -> dict[str, Any]:
    with open(root / "build.toml", "rb") as f:
        build = tomllib.load(f)
    if "torch-noarch" not in build:
        raise ValueError(
            f"{root / 'build.toml'} has no [torch-noarch] section: this script builds noarch kernels only."
        )
    return build


def git_revision(root: Path = KERNEL_ROOT) -> str:
    """Short commit of the kernel source (suffixed _dirty with uncommitted changes), or "dev" outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=7", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "dev"
    return f"{rev}_dirty" if dirty else rev


def digest(variant: Path) -> dict[str, Any]:
    """sha256 of every file of the variant (base64, by relative path), as kernel-builder records it: metadata.json,
    __pycache__ and *.pyc are left out."""
    files = {}
    for path in sorted(variant.rglob("*")):
        rel = path.relative_to(variant)
        if not path.is_file() or rel.as_posix() in ("metadata.json", "metadata.json.sigstore"):
            continue
        if "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        files[rel.as_posix()] = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return {"algorithm": "sha256", "files": files}


def build_variant(build: dict[str, Any], backend: str, out: Path, rev: str, root: Path = KERNEL_ROOT) -> Path:
    general = build["general"]
    module = general["name"].replace("-", "_")
    source = root / "torch-ext" / module
    if not (source / "__init__.py").is_file():
        raise FileNotFoundError(f"{source}/__init__.py is missing: the kernel's Python module must be there.")
    variant = out / f"torch-{backend}"
    if variant.exists():
        shutil.rmtree(variant)
    shutil.copytree(source, variant, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    metadata = {
        "name": general["name"],
        "id": f"_{module}_{backend}_{rev}",
        "version": general["version"],
        "license": general["license"],
        "python-depends": list(general.get("python-depends", [])),
        "backend": {"type": backend},
        "digest": digest(variant),
    }
    (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return variant


def main(argv: Optional[list[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=KERNEL_ROOT / "build", help="output folder (default kernels/build)")
    parser.add_argument("--backends", help="comma-separated backends (default: those of build.toml)")
    parser.add_argument("--rev", help="revision baked into the kernel id (default: the git commit)")
    args = parser.parse_args(argv)
    build = read_build_toml()
    backends = args.backends.split(",") if args.backends else list(build["general"]["backends"])
    unknown = [b for b in backends if b not in KNOWN_BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; known: {', '.join(KNOWN_BACKENDS)}")
    rev = args.rev or git_revision()
    variants = [build_variant(build, backend, args.out, rev) for backend in backends]
    for variant in variants:
        print(variant)
    return variants


if __name__ == "__main__":
    main(sys.argv[1:])
