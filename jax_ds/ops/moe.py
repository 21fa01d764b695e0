"""MoE routing ops: permute token copies to expert-major order, and the weighted inverse.

`moe_permute` turns top-k routing into the contiguous layout `grouped_fp8_gemm` consumes (rows
sorted by expert, group sizes), optionally quantizing the rows to FP8 on the way (DeepEP's FP8
dispatch: the 1x128 scales travel with the tokens); `moe_unpermute` undoes it and applies the
top-k weights. Expert id -1 marks a dropped or masked slot, as in DeepEP. Pure JAX for now: the
CUDA kernels (`ffi/moe/`) are the GPU 2 issue.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_ds.ops.quant import quantize_fp8


def moe_permute(x, topk_idx, num_experts: int, *, fp8: bool = False):
    """Sorts token copies by expert: row r of the result is one (token, expert) assignment.

    Args:
      x: [N, D] tokens.
      topk_idx: [N, K] int expert ids in [0, num_experts); -1 marks a dropped slot.
      num_experts: E, static.
      fp8: also quantize the sorted rows per (1, 128) for an FP8 grouped GEMM.

    Returns:
      (x_sorted [N*K, D] in x.dtype, group_sizes [E] int32, perm [N, K] int32), or with fp8
      (x_sorted float8_e4m3fn, scales [N*K, ceil(D/128)] f32, group_sizes, perm).
      Rows are grouped by expert in increasing order; rows past sum(group_sizes) are zero.
      perm[n, k] is the row holding assignment (n, k), -1 where topk_idx is -1.
    """
    n, k = topk_idx.shape
    flat_e = topk_idx.reshape(n * k).astype(jnp.int32)
    key = jnp.where(flat_e < 0, num_experts, flat_e)  # dropped slots sort after every expert
    order = jnp.argsort(key, stable=True)  # stable: rows of one expert keep token order
    rows = jnp.arange(n * k, dtype=jnp.int32)
    group_sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    x_sorted = jnp.where((rows < group_sizes.sum())[:, None], x[order // k], 0).astype(x.dtype)
    perm = jnp.zeros(n * k, jnp.int32).at[order].set(rows)
    perm = jnp.where(flat_e < 0, -1, perm).reshape(n, k)
    if fp8:
        x_fp8, scales = quantize_fp8(x_sorted, block=(1, 128))
        return x_fp8, scales, group_sizes, perm
    return x_sorted, group_sizes, perm


def moe_unpermute(y, perm, topk_weights):
    """The inverse of `moe_permute` fused with the top-k combine: out[n] = sum_k w[n,k] y[perm[n,k]].

    Args:
      y: [M, D] expert outputs in `moe_permute`'s row order (M >= max(perm) + 1).
      perm: [N, K] int32 from `moe_permute`; -1 slots contribute nothing.
      topk_weights: [N, K] gate weights.

    Returns:
      [N, D] in y.dtype, accumulated in float32.
    """
    rows_NKD = y[jnp.maximum(perm, 0)]
    w_NK = jnp.where(perm >= 0, topk_weights, 0).astype(jnp.float32)
    out = jnp.einsum("NKD,NK->ND", rows_NKD, w_NK, preferred_element_type=jnp.float32)
    return out.astype(y.dtype)
