"""jdlora_kernels: Triton kernels for mixed-adapter JD-LoRA serving (LoRA bundles compressed into a shared basis).

For a batch in which token t uses adapter slot a(t) (-1 = base model) of cluster c(a):

    y[t] += U_c · Σ_a · (V_c · x[t])        U_c: [d_out, r], V_c: [r, d_in] shared per cluster; Σ_a: [r, r] or [r]

Usage (one metadata per batch, shared by every layer; two launches per layer):

    meta = JDLoraKernelMeta.from_token_slots(token_slots_cpu, slot_to_cluster_cpu, device="cuda")
    add_jd_lora(y, x, meta, U, V, sigma)                         # y: [T, d_out], updated in place
    add_jd_lora(y_qkv, x, meta, [U_q, U_k, U_v], [V_q, V_k, V_v], [S_q, S_k, S_v])    # fused slices
    add_jd_lora_dense(y, x, meta, U, V, sigma)                   # one basis (C = 1): dense GEMMs, no Triton

Stands alone (torch + triton only) so that it ships as a Hugging Face Hub kernel; every kernel has its PyTorch
reference next to it (`*_ref`). On CPU tensors the kernels run only in the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from .delta import add_jd_lora, add_jd_lora_ref, jd_lora_delta, jd_lora_delta_ref
from .dense import add_jd_lora_dense
from .expand import jd_lora_expand, jd_lora_expand_ref
from .meta import JDLoraKernelMeta
from .shrink import INTERPRETED, SIGMA_DIAG, SIGMA_ROW, SIGMA_TILE, jd_lora_shrink, jd_lora_shrink_ref

__version__ = "0.1.0"

__all__ = [
    "INTERPRETED",
    "SIGMA_DIAG",
    "SIGMA_ROW",
    "SIGMA_TILE",
    "JDLoraKernelMeta",
    "add_jd_lora",
    "add_jd_lora_dense",
    "add_jd_lora_ref",
    "jd_lora_delta",
    "jd_lora_delta_ref",
    "jd_lora_expand",
    "jd_lora_expand_ref",
    "jd_lora_shrink",
    "jd_lora_shrink_ref",
]
