"""The kernels compile for real GPUs: NVIDIA sm_80 / sm_90 down to the cubin (with the ptxas bundled in the triton
wheel) and AMD gfx942 (ROCm) down to the code object.

The interpreter runs the kernels' Python on numpy and forgives what the compiler does not (types that differ
between branches, unsupported casts, layouts), so a CPU-only CI would not see a kernel that fails to compile. This
test records the launches the real wrappers make (configurations as on a GPU, every Σ mode, fused and single
slices, fp16 / bf16 / fp32) and compiles each one ahead of time for those targets: no GPU needed, nothing runs.

It needs the kernels compiled normally (no interpreter), so the work runs in a subprocess: `python <this file>`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# (backend, architecture, warp size, dtypes compiled for it); AMD where the triton build has its backend.
TARGETS = [("cuda", 90, 32, ("fp16", "bf16", "fp32")), ("cuda", 80, 32, ("bf16",))]
if importlib.util.find_spec("triton.backends.amd") is not None:
    TARGETS.append(("hip", "gfx942", 64, ("bf16",)))


def test_kernels_compile_for_nvidia_and_amd_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("compiled ")]
    # 3 Σ modes (one of them fused) + 2 expands (single / fused), per dtype and target.
    assert len(compiled) == 5 * sum(len(target[-1]) for target in TARGETS), done.stdout


def _record_launches() -> list[tuple]:
    """Call the launch wrappers on CPU tensors with the kernels replaced by recorders: [(kernel, args, kwargs)]."""
    import jdlora_kernels as jk
    import torch
    from jdlora_kernels import _utils, expand, shrink

    assert not jk.INTERPRETED, "TRITON_INTERPRET must be unset for this check"
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    _utils.check_launchable = lambda device, interpreted: None
    shrink._jd_shrink_kernel = Recorder(shrink._jd_shrink_kernel)
    expand._jd_expand_kernel = Recorder(expand._jd_expand_kernel)
    gen = torch.Generator().manual_seed(0)
    T, d_in, d_out, r, N, C = 48, 256, 192, 40, 6, 2
    slots = torch.randint(-1, N, (T,), generator=gen)
    meta = jk.JDLoraKernelMeta.from_token_slots(slots, torch.arange(N) % C)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(T, d_in, dtype=dtype)
        U = [torch.randn(C, d, r, dtype=dtype) for d in (d_out, 64)]
        V = [torch.randn(C, r, d_in, dtype=dtype) for _ in range(2)]
        full = [torch.randn(N, r, r, dtype=dtype) for _ in range(2)]
        diag = torch.randn(N, r, dtype=dtype)
        jk.jd_lora_shrink(x, meta, V[0], diag)
        jk.jd_lora_shrink(x, meta, V[0], full[0], sigma_mode=jk.SIGMA_TILE)
        z = jk.jd_lora_shrink(x, meta, V, full, sigma_mode=jk.SIGMA_ROW, config={"SPLIT_K": 4})
        jk.jd_lora_expand(z[:1].contiguous(), meta, U[0])
        jk.jd_lora_expand(z, meta, U)
    return launches


def _compile(kernel, args, kwargs, target) -> None:
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    options = {name: kwargs[name] for name in ("num_warps", "num_stages")}
    constexprs = {name: value for name, value in kwargs.items() if name not in options}
    params = [name for name in kernel.arg_names if name not in constexprs]
    signature, attrs = {}, {}
    for name, value in zip(params, args, strict=True):
        # The JIT's own specialisation: pointer dtypes, 16-byte alignment / divisibility, ints equal to 1 as constants.
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[name] = value
        else:
            signature[name] = kind
            attrs[(kernel.arg_names.index(name),)] = BaseBackend.parse_attr(spec)
    for name in constexprs:
        signature[name] = "constexpr"
    source = ASTSource(kernel, signature, constexprs, attrs)
    triton.compile(source, target=target, options=options)


def main() -> int:
    import torch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    launches = _record_launches()
    from triton.backends.compiler import GPUTarget

    for backend, arch, warp_size, dtypes in TARGETS:
        for kernel, args, kwargs in launches:
            dtype = names[args[1].dtype]  # V (shrink) or U (expand)
            if dtype not in dtypes:
                continue
            _compile(kernel, args, kwargs, GPUTarget(backend, arch, warp_size))
            mode = kwargs.get("SIGMA_MODE", "-")
            print(f"compiled {kernel.__name__} {backend} {arch} {dtype} mode={mode} sliced={kwargs['SLICED']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
