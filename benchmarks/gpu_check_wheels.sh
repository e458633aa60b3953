#!/usr/bin/env bash
# Prepare .gpu_wheels/: the Python packages the GPU run falls back to when the GPU image lacks one or has a version
# outside pyproject's ranges (the GPU machine has no network: nothing can be installed there). benchmarks/gpu_check.py
# uses the image's own packages first and unpacks only the wheels it needs onto PYTHONPATH.
#
#   bash benchmarks/gpu_check_wheels.sh                     # download into .gpu_wheels/ (git-ignored, < 48 MiB)
#   bash benchmarks/gpu_check_wheels.sh --check PYTHON      # then rehearse the GPU run with that interpreter twice:
#                                                           # image first, and every carried wheel (--prefer-carried)
#
# The wheels are for the GPU image's CPython (3.12, manylinux x86_64; JDLORA_GPU_PYVER changes it): pure-Python ones,
# and abi3 builds of safetensors and tokenizers (any CPython >= 3.10), and regex for that exact version.
# Versions: the ones the test suite runs with (transformers, peft, accelerate, safetensors, tokenizers), and
# huggingface_hub 1.33.0 (the GPU image's own; huggingface_hub 2.x would also need httpx2, which the image lacks).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PYVER="${JDLORA_GPU_PYVER:-3.12}"
MAX_BYTES=$((48 * 1024 * 1024))  # the device run carries the working tree and these in 64 MiB
PACKAGES=(
    peft==0.21.2
    transformers==5.24.0
    huggingface_hub==1.33.0
    accelerate==1.15.0
    safetensors==0.8.0
    tokenizers==0.23.3
    regex==2026.11.19
)

check_python=""
if [ "${1:-}" = "--check" ]; then
    check_python="${2:?--check needs the interpreter to rehearse with, e.g. /work/torch211-venv/bin/python}"
fi

tmp=$(mktemp -d "$DEST.tmp.XXXXXX")  # beside DEST: the final rename stays on one filesystem
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" "${PACKAGES[@]}" 2> >(grep -v "^WARNING: Location" >&2)
count=$(find "$tmp" -name '*.whl' | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
    echo "expected ${#PACKAGES[@]} wheels, got $count in $tmp" >&2
    exit 1
fi
bytes=$(du -sb "$tmp" | cut -f1)
if [ "$bytes" -gt "$MAX_BYTES" ]; then
    echo "the wheels take $bytes bytes, more than $MAX_BYTES: the device run could not carry them" >&2
    exit 1
fi
(cd "$tmp" && sha256sum ./*.whl > SHA256SUMS)
if [ -e "$DEST" ]; then
    unknown=$(find "$DEST" -mindepth 1 ! -name '*.whl' ! -name SHA256SUMS | head -3)
    if [ -n "$unknown" ]; then
        echo "$DEST holds files this script did not write ($unknown): move them away first" >&2
        exit 1
    fi
    rm -rf "$DEST"
fi
mv "$tmp" "$DEST"
trap - EXIT
echo "$DEST: $count wheels, $((bytes / 1024 / 1024)) MiB"
ls -1 "$DEST"

if [ -n "$check_python" ]; then
    status=0
    for mode in image-first prefer-carried; do
        out=$(mktemp -d /tmp/jdlora-gpu-rehearsal-XXXXXX)
        extra=()
        [ "$mode" = prefer-carried ] && extra=(--prefer-carried)
        echo "== rehearsal with $check_python ($mode): $out/summary.md"
        JDLORA_GPU_PYTHON="$check_python" bash benchmarks/gpu_check.sh "$out" --dry-run --overwrite "${extra[@]}" \
            > "$out.log" 2>&1 || status=1
        grep '^\[gpu_check\]\|^Carried wheels' "$out.log" || cat "$out.log"
    done
    exit "$status"
fi
