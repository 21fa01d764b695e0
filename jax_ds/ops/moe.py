"""MoE routing ops: permute token copies to expert-major order, and the weighted inverse.

`moe_permute` turns top-k routing into the contiguous layout `grouped_fp8_gemm` consumes (rows
sorted by expert, group sizes), optionally quantizing the rows to FP8 on the way (DeepEP's FP8
dispatch: the 1x128 scales travel with the tokens); `moe_unpermute` undoes it and applies the
top-k weights. An expert id outside [0, num_experts) (-1, as DeepEP uses) marks a dropped or
masked slot. `moe_dispatch_layout` counts tokens per expert and per EP rank (DeepEP's layout).

The CUDA kernels (ffi/moe/routing.cu) produce exactly the reference's row order: a layout kernel
places each expert's slots in flat order (a stable counting sort), a token-major kernel reads each
token once and writes its K copies (with the FP8 cast fused: quantized once per token), and a
combine kernel sums the weighted expert outputs per token in
float32. Gradients (custom_vjp) flow through the non-FP8 permute and through unpermute to both y
and the weights, computed by the pure-JAX expressions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi
from jax_ds.ops._vma import match_vma
from jax_ds.ops._checks import check_dtype, check_floating, check_ndim, is_int
from jax_ds.ops.quant import quantize_fp8

LAYOUT_TARGET = "jax_ds_moe_layout"
PERMUTE_TARGET = "jax_ds_moe_permute"
PERMUTE_FP8_TARGET = "jax_ds_moe_permute_fp8"
UNPERMUTE_TARGET = "jax_ds_moe_unpermute"
_ffi.declare_op("moe_permute", LAYOUT_TARGET)
_ffi.declare_op("moe_unpermute", UNPERMUTE_TARGET)
MAX_EXPERTS = 4096  # the layout kernel's shared-memory histogram
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float32)
_INTS = (jnp.int32, jnp.int64, jnp.int16, jnp.int8, jnp.uint8, jnp.uint16, jnp.uint32)


def _expert_ids(topk_idx, num_experts):
    """topk_idx as int32, with ids outside [0, num_experts) made -1 before the cast: a wider id
    would wrap onto a real expert (int64 2**32 -> expert 0, with jax_enable_x64 or from numpy)."""
    if np.dtype(topk_idx.dtype) == np.dtype(np.int32):
        return topk_idx
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    return jnp.where(valid, topk_idx, -1).astype(jnp.int32)


def _layout_reference(topk_idx, num_experts):
    """(group_sizes [E], perm [N, K], order [N*K]): order[r] = the flat slot placed at row r."""
    n, k = topk_idx.shape
    flat_e = topk_idx.reshape(n * k).astype(jnp.int32)
    dropped = (flat_e < 0) | (flat_e >= num_experts)
    key = jnp.where(dropped, num_experts, flat_e)  # dropped slots sort after every expert
    order = jnp.argsort(key, stable=True)  # stable: rows of one expert keep token order
    rows = jnp.arange(n * k, dtype=jnp.int32)
    group_sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    perm = jnp.zeros(n * k, jnp.int32).at[order].set(rows)
    return group_sizes, jnp.where(dropped, -1, perm).reshape(n, k), order


def _use_kernel(op, target, impl, x_dtype, num_experts=1):
    unsupported = None
    if jnp.dtype(x_dtype) not in map(jnp.dtype, _KERNEL_DTYPES) or num_experts > MAX_EXPERTS:
        unsupported = (f"{op}: the kernel takes bf16 / f32 rows and at most {MAX_EXPERTS} "
                       f"experts, got {jnp.dtype(x_dtype).name} and {num_experts}")
    return _ffi.resolve_impl(op, target, impl, unsupported) == "ffi"


def _layout_kernel(topk_idx, num_experts):
    n, k = topk_idx.shape
    i32 = jnp.int32
    return _ffi.kernel_call(LAYOUT_TARGET, (jax.ShapeDtypeStruct((num_experts,), i32),
                                            jax.ShapeDtypeStruct((n, k), i32),
                                            jax.ShapeDtypeStruct((n * k,), i32)),
                            topk_idx.astype(i32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _permute(x, topk_idx, num_experts, use_kernel):
    return _permute_fwd(x, topk_idx, num_experts, use_kernel)[0]


def _permute_fwd(x, topk_idx, num_experts, use_kernel):
    n, k = topk_idx.shape
    if use_kernel:
        group_sizes, perm, src_row = _layout_kernel(topk_idx, num_experts)
        x_sorted = _ffi.kernel_call(PERMUTE_TARGET,
                                    jax.ShapeDtypeStruct((n * k, x.shape[1]), x.dtype),
                                    x, perm, src_row)
    else:
        group_sizes, perm, order = _layout_reference(topk_idx, num_experts)
        rows = jnp.arange(n * k)
        x_sorted = jnp.where((rows < group_sizes.sum())[:, None], x[order // k], 0)
        x_sorted = x_sorted.astype(x.dtype)
    return (x_sorted, group_sizes, perm), perm


def _permute_bwd(num_experts, use_kernel, perm, cts):
    dx_sorted = cts[0]
    # x_sorted[perm[n, k]] = x[n]: the gradient sums the copies of each token.
    dx = _unpermute_reference(dx_sorted, perm, jnp.ones(perm.shape, jnp.float32))
    return dx, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def moe_permute(x, topk_idx, num_experts: int, *, fp8: bool = False, impl: str = "auto"):
    """Sorts token copies by expert: row r of the result is one (token, expert) assignment.

    Args:
      x: [N, D] tokens (the kernels take bf16 / f32; other dtypes use the reference under "auto").
      topk_idx: [N, K] int expert ids in [0, num_experts); other ids (-1) mark dropped slots.
      num_experts: E, static.
      fp8: also quantize the sorted rows per (1, 128) for an FP8 grouped GEMM (fused in the
        kernel, bit-identical to `quantize_fp8`). Not differentiable.
      impl: "auto", "ffi" or "xla".

    Returns:
      (x_sorted [N*K, D] in x.dtype, group_sizes [E] int32, perm [N, K] int32), or with fp8
      (x_sorted float8_e4m3fn, scales [N*K, ceil(D/128)] f32, group_sizes, perm).
      Rows are grouped by expert in increasing order, within an expert by token (then slot);
      rows past sum(group_sizes) are zero. perm[n, k] is the row holding assignment (n, k), -1
      for a dropped slot.
    """
    op = "moe_permute"
    check_ndim(op, "x", x, 2, "[N, D]")
    check_ndim(op, "topk_idx", topk_idx, 2, "[N, K]")
    check_dtype(op, "topk_idx", topk_idx, _INTS)
    if topk_idx.shape[0] != x.shape[0] or min(topk_idx.shape) < 1 or x.shape[1] < 1:
        raise ValueError(f"{op}: expected x [N, D] and topk_idx [N, K] with N, K, D >= 1, got "
                         f"x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)}")
    if not is_int(num_experts) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")
    num_experts = int(num_experts)
    if not isinstance(fp8, (bool, np.bool_)):  # "no" or 1.0 would pick a path by truthiness
        raise TypeError(f"{op}: fp8 must be a Python bool, got {type(fp8).__name__} {fp8!r}")
    if fp8:
        check_floating(op, "x", x)  # the FP8 cast takes floating rows
    topk_idx = _expert_ids(topk_idx, num_experts)
    use_kernel = _use_kernel(op, LAYOUT_TARGET, impl, x.dtype, num_experts)
    if not fp8:
        return _permute(x, topk_idx, num_experts, use_kernel)
    n, k = topk_idx.shape
    x = jax.lax.stop_gradient(x)
    if not use_kernel:
        x_sorted, group_sizes, perm = _permute(x, topk_idx, num_experts, False)
        x_fp8, scales = quantize_fp8(x_sorted, block=(1, 128), impl="xla")
        return x_fp8, scales, group_sizes, perm
    group_sizes, perm, src_row = _layout_kernel(topk_idx, num_experts)
    d = x.shape[1]
    x_fp8, scales = _ffi.kernel_call(
        PERMUTE_FP8_TARGET, (jax.ShapeDtypeStruct((n * k, d), jnp.float8_e4m3fn),
                             jax.ShapeDtypeStruct((n * k, -(-d // 128)), jnp.float32)),
        x, perm, src_row)
    return x_fp8, scales, group_sizes, perm


def _unpermute_reference(y, perm, topk_weights):
    valid = (perm >= 0) & (perm < y.shape[0])
    rows_NKD = jnp.where(valid[..., None], y[jnp.clip(perm, 0, y.shape[0] - 1)], 0)
    w_NK = jnp.where(valid, topk_weights, 0).astype(jnp.float32)
    out = jnp.einsum("NKD,NK->ND", rows_NKD, w_NK, preferred_element_type=jnp.float32)
    return out.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _unpermute(y, perm, topk_weights, use_kernel):
    if not use_kernel:
        return _unpermute_reference(y, perm, topk_weights)
    return _ffi.kernel_call(UNPERMUTE_TARGET,
                            jax.ShapeDtypeStruct((perm.shape[0], y.shape[1]), y.dtype),
                            y, perm, topk_weights.astype(jnp.float32))


def _unpermute_fwd(y, perm, topk_weights, use_kernel):
    return _unpermute(y, perm, topk_weights, use_kernel), (y, perm, topk_weights)


def _unpermute_bwd(use_kernel, res, dout):
    y, perm, w = res
    valid = (perm >= 0) & (perm < y.shape[0])
    dout32 = dout.astype(jnp.float32)
    w32 = jnp.where(valid, w, 0).astype(jnp.float32)
    rows = jnp.where(valid, perm, y.shape[0])  # dropped slots scatter out of range (discarded)
    dy = jnp.zeros(y.shape, jnp.float32).at[rows.reshape(-1)].add(
        (w32[..., None] * dout32[:, None, :]).reshape(-1, y.shape[1]), mode="drop")
    y_rows = jnp.where(valid[..., None], y[jnp.clip(perm, 0, y.shape[0] - 1)], 0)
    dw = jnp.einsum("ND,NKD->NK", dout32, y_rows.astype(jnp.float32))
    return dy.astype(y.dtype), None, dw.astype(w.dtype)


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def moe_unpermute(y, perm, topk_weights, *, impl: str = "auto"):
    """The inverse of `moe_permute` fused with the top-k combine: out[n] = sum_k w[n,k] y[perm[n,k]].

    Args:
      y: [M, D] expert outputs in `moe_permute`'s row order.
      perm: [N, K] int32 from `moe_permute`; slots outside [0, M) (-1) contribute nothing.
      topk_weights: [N, K] gate weights.
      impl: "auto", "ffi" or "xla".

    Returns:
      [N, D] in y.dtype, accumulated in float32 over k in order. Differentiable in y and
      topk_weights.
    """
    op = "moe_unpermute"
    check_ndim(op, "y", y, 2, "[M, D]")
    check_ndim(op, "perm", perm, 2, "[N, K]")
    check_dtype(op, "perm", perm, (jnp.int32,))
    check_floating(op, "y", y)
    check_floating(op, "topk_weights", topk_weights)
    if topk_weights.shape != perm.shape:
        raise ValueError(f"{op}: topk_weights {tuple(topk_weights.shape)} must match perm "
                         f"{tuple(perm.shape)}")
    use_kernel = _use_kernel(op, UNPERMUTE_TARGET, impl, y.dtype)  # resolved (or refused) first
    if y.shape[0] == 0:  # every slot dropped (y sliced to sum(group_sizes) = 0): all zeros
        return jnp.zeros((perm.shape[0], y.shape[1]), y.dtype)
    # inside shard_map the cotangents vary over every axis any input does: so must the inputs
    y, perm, topk_weights = match_vma(y, perm, topk_weights)
    return _unpermute(y, perm, topk_weights, use_kernel)


def moe_dispatch_layout(topk_idx, num_experts: int, num_ranks: int):
    """DeepEP's dispatch layout: experts are split evenly and contiguously over `num_ranks`.

    Returns:
      (tokens_per_expert [E] int32, tokens_per_rank [R] int32, is_token_in_rank [N, R] bool):
      a token counts once per rank however many of its experts live there; ids outside
      [0, num_experts) count nowhere.
    """
    op = "moe_dispatch_layout"
    check_ndim(op, "topk_idx", topk_idx, 2, "[N, K]")
    check_dtype(op, "topk_idx", topk_idx, _INTS)  # a float id would truncate onto an expert
    for name, value in (("num_experts", num_experts), ("num_ranks", num_ranks)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    if num_experts % num_ranks:
        raise ValueError(f"{op}: num_experts ({num_experts}) must be a positive multiple of "
                         f"num_ranks ({num_ranks})")
    idx = _expert_ids(topk_idx, num_experts)
    valid = (idx >= 0) & (idx < num_experts)
    per_expert = jnp.zeros(num_experts, jnp.int32).at[jnp.where(valid, idx, num_experts)].add(
        1, mode="drop")
    rank = jnp.where(valid, idx // (num_experts // num_ranks), num_ranks)
    in_rank = (rank[:, :, None] == jnp.arange(num_ranks)[None, None, :]).any(axis=1)
    return per_expert, in_rank.sum(axis=0).astype(jnp.int32), in_rank
