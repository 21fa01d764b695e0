"""FP8 quantization with DeepSeek-V3 block scaling (activations 1x128, weights 128x128).

Each block of x gets one float32 scale so that its largest finite magnitude maps to 448, the
largest finite float8_e4m3fn, and x ~= x_fp8 * scale. The math matches DeepGEMM's
`per_token_cast_to_fp8` / `per_block_cast_to_fp8` (deep_gemm/utils/math.py: `sf = amax / 448.0`,
`x * (1.0 / sf)`) as PyTorch runs them on CUDA, and the CUDA kernel, bit for bit:

  amax  = max(max |x| over the block's finite elements (padding counts as 0), 1e-4)
  "f32":   scale = amax * (1 / 448);                  x_fp8 = e4m3(x * (1 / scale))
  "ue8m0": scale = 2 ** ceil(log2(amax * (1 / 448)));  x_fp8 = e4m3(x * (1 / scale))

in float32, in that order, cast with round-to-nearest-even. `amax * (1 / 448)`, with 1/448 rounded
to float32 first, is what `amax / 448.0` computes there (PyTorch on CUDA turns a division by a
Python scalar into a multiplication by its reciprocal) and in XLA (which rewrites division by a
constant the same way); it can differ from an IEEE division in the last bit. `1 / scale` is an
IEEE division (PyTorch's `1.0 / sf` is `sf.reciprocal()`, correctly rounded on CUDA; XLA's own
float32 division on GPU is not, so the reference divides in float64). "ue8m0" scales are exact
powers of two (the values of the UE8M0 format) stored as float32; ceil(log2(.)) is read off the
float's bits, so it is exact. (Before 2026-12-05 the "f32" multiplier was 448 / amax, which
differs from 1 / scale in the last bit and then moved ~0.1% of bf16 inputs' e4m3 bytes.)

Non-finite inputs: NaN and +-Inf become NaN in x_fp8 (e4m3fn has no Inf) and are left out of their
block's amax. This is deliberate: the rest of the block keeps a sane scale, and the bad value
poisons the GEMM output where it lands instead of silently saturating to +-448.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi
from jax_ds.ops._checks import (BLOCK_K, FP8, FP8_MAX, cdiv, check_block, check_choice,
                                check_dtype, check_floating, check_min_ndim, check_quantize_input,
                                check_shape, prod)

TARGET = "jax_ds_quantize_fp8"
SCALE_FORMATS = ("f32", "ue8m0")
AMAX_MIN = np.float32(1e-4)  # all-zero blocks get scale 1e-4 / 448 rather than 0
INV_FP8_MAX = np.float32(1.0 / FP8_MAX)  # float32(1/448), see the module docstring

_ffi.declare_op("quantize_fp8", TARGET)


def _pow2_ceil(v):
    """(2 ** ceil(log2(v)), its inverse) for positive normal float32 v, exactly, from the bits
    (DeepGEMM's fast_log2_ceil): no log2 or division whose rounding could differ by backend."""
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    exponent = (bits >> 23) & 0xFF  # biased exponent
    exponent = exponent + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)  # round up unless exact
    pow2 = jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)
    inverse = jax.lax.bitcast_convert_type((254 - exponent) << 23, jnp.float32)
    return pow2, inverse


def _div_rn(numerator: float, denominator):
    """numerator / denominator rounded once to float32 (IEEE), on every backend.

    XLA:GPU lowers float32 division to div.full.f32 (up to 2 ulp off), the kernel divides with
    IEEE rounding. A float64 division rounded to float32 is correctly rounded (53 >= 2 * 24 + 2
    bits), so the reference divides in float64 where the backend has it.
    """
    if jax.default_backend() == "tpu":  # no float64 there
        return np.float32(numerator) / denominator
    with jax.enable_x64(True):
        return (np.float64(numerator) / denominator.astype(jnp.float64)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compile per shape when called eagerly
def _quantize_3d(x_BMK, block_m: int, ue8m0: bool):
    """Reference on x [B, M, K] with blocks (block_m, 128) -> e4m3 [B, M, K], f32 [B, Mb, Kb]."""
    b, m, k = x_BMK.shape
    mb, kb = cdiv(m, block_m), cdiv(k, BLOCK_K)
    x = jnp.pad(x_BMK.astype(jnp.float32), ((0, 0), (0, mb * block_m - m), (0, kb * BLOCK_K - k)))
    x = x.reshape(b, mb, block_m, kb, BLOCK_K)
    finite = jnp.isfinite(x)
    amax = jnp.max(jnp.where(finite, jnp.abs(x), 0.0), axis=(2, 4))  # [B, Mb, Kb]
    amax = jnp.maximum(amax, AMAX_MIN)
    if ue8m0:
        scale, inv = _pow2_ceil(amax * INV_FP8_MAX)
    else:
        scale = amax * INV_FP8_MAX
        inv = _div_rn(1.0, scale)
    q = jnp.where(finite, x * inv[:, :, None, :, None], jnp.nan)
    q = q.reshape(b, mb * block_m, kb * BLOCK_K)[:, :m, :k]
    return q.astype(FP8), scale


def quantize_fp8_reference(x, *, block=(1, BLOCK_K), scale_format="f32"):
    """Pure-JAX FP8 block quantization; the CPU path, the kernels' oracle.

    Equivalent to the following JAX code for a 2-D x [M, K] and blocks (bm, 128), with x padded
    with zeros to whole blocks and reshaped to xb [M/bm, bm, K/128, 128]:

      amax = jnp.maximum(jnp.where(isfinite(xb), abs(xb), 0).max(axis=(1, 3)), 1e-4)
      scale = amax * float32(1 / 448)             # "ue8m0": 2 ** ceil(log2(that))
      x_fp8 = where(isfinite(xb), xb * (1 / scale), nan).astype(float8_e4m3fn)

    Args:
      x: bf16 / f16 / f32, [..., K] for block (1, 128) or [..., M, K] for block (128, 128).
      block: (1, 128) per-token groups, or (128, 128) blocks.
      scale_format: "f32" (scale = amax / 448) or "ue8m0" (power-of-two scales, rounded up).

    Returns:
      x_fp8: float8_e4m3fn, x's shape.
      scales: float32, [..., ceil(K/128)] for (1, 128); [..., ceil(M/128), ceil(K/128)] for
        (128, 128). x ~= x_fp8 * scales broadcast over each block.
    """
    op = "quantize_fp8_reference"
    block = check_block(op, block)
    check_choice(op, "scale_format", scale_format, SCALE_FORMATS)
    check_quantize_input(op, x, block)
    ue8m0 = scale_format == "ue8m0"
    if block[0] == 1:  # every row is its own block row: fold leading dims into M
        q, s = _quantize_3d(x.reshape(1, prod(x.shape[:-1]), x.shape[-1]), 1, ue8m0)
        return q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])
    lead = x.shape[:-2]
    q, s = _quantize_3d(x.reshape(prod(lead), *x.shape[-2:]), block[0], ue8m0)
    return q.reshape(x.shape), s.reshape(*lead, *s.shape[-2:])


def _quantize_ffi_2d(x_MK, block_m: int, ue8m0: bool):
    m, k = x_MK.shape
    out_types = (jax.ShapeDtypeStruct((m, k), FP8),
                 jax.ShapeDtypeStruct((cdiv(m, block_m), cdiv(k, BLOCK_K)), jnp.float32))
    return _ffi.kernel_call(TARGET, out_types, x_MK, block_m=np.int32(block_m),
                            ue8m0=np.bool_(ue8m0))


def quantize_fp8(x, *, block=(1, BLOCK_K), scale_format="f32", impl="auto"):
    """Quantizes x to float8_e4m3fn with one float32 scale per block (see the module docstring).

    Args:
      x: bf16 / f16 / f32, [..., K] for block (1, 128) or [..., M, K] for block (128, 128).
        Any K >= 1 and M >= 1 (ragged tails form partial blocks, padded with zeros).
      block: (1, 128) for activations (per token, per 128 channels) or (128, 128) for weights.
      scale_format: "f32" or "ue8m0" (power-of-two scales, as float32).
      impl: "auto" (CUDA kernel when available, else the reference), "ffi" or "xla".

    Returns:
      (x_fp8 float8_e4m3fn [x.shape], scales float32): scales [..., ceil(K/128)] for (1, 128),
      [..., ceil(M/128), ceil(K/128)] for (128, 128).
    """
    op = "quantize_fp8"
    block = check_block(op, block)
    check_choice(op, "scale_format", scale_format, SCALE_FORMATS)
    check_quantize_input(op, x, block)
    path = _ffi.resolve_impl(op, TARGET, impl)
    if path == "xla" or x.size == 0:
        return quantize_fp8_reference(x, block=block, scale_format=scale_format)
    ue8m0 = scale_format == "ue8m0"
    xk = x if x.dtype != jnp.float16 else x.astype(jnp.float32)  # kernel reads bf16 or f32
    if block[0] == 1:
        q, s = _quantize_ffi_2d(xk.reshape(prod(x.shape[:-1]), x.shape[-1]), 1, ue8m0)
        return q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])
    if x.ndim == 2:
        return _quantize_ffi_2d(xk, block[0], ue8m0)
    lead = x.shape[:-2]
    q, s = jax.vmap(lambda xi: _quantize_ffi_2d(xi, block[0], ue8m0))(
        xk.reshape(prod(lead), *x.shape[-2:]))
    return q.reshape(x.shape), s.reshape(*lead, *s.shape[-2:])


def dequantize_fp8(x_fp8, scales, block=(1, BLOCK_K), *, out_dtype=jnp.float32):
    """x_fp8 * scales, each scale broadcast over its block; the inverse of `quantize_fp8`.

    Args:
      x_fp8: float8_e4m3fn, [..., K] for block (1, 128), [..., M, K] for block (128, 128).
      scales: float32, [..., ceil(K/128)] or [..., ceil(M/128), ceil(K/128)].
      block: the block `quantize_fp8` used.
      out_dtype: dtype of the result (computed in float32).

    Returns:
      out_dtype array of x_fp8's shape.
    """
    op = "dequantize_fp8"
    block = check_block(op, block)
    check_min_ndim(op, "x_fp8", x_fp8, 1, "[..., K]")
    check_dtype(op, "x_fp8", x_fp8, (FP8,))
    check_floating(op, "out_dtype", out_dtype)
    check_dtype(op, "scales", scales, (jnp.float32,))
    k = x_fp8.shape[-1]
    if block[0] == 1:
        check_shape(op, "scales", scales, (*x_fp8.shape[:-1], cdiv(k, BLOCK_K)),
                    "[..., ceil(K/128)]")
        s = jnp.repeat(scales, BLOCK_K, axis=-1)[..., :k]
    else:
        if x_fp8.ndim < 2:
            raise ValueError(f"{op}: x_fp8 must be [..., M, K] for block (128, 128), got shape "
                             f"{tuple(x_fp8.shape)}")
        m = x_fp8.shape[-2]
        check_shape(op, "scales", scales, (*x_fp8.shape[:-2], cdiv(m, BLOCK_K), cdiv(k, BLOCK_K)),
                    "[..., ceil(M/128), ceil(K/128)]")
        s = jnp.repeat(jnp.repeat(scales, BLOCK_K, axis=-2), BLOCK_K, axis=-1)[..., :m, :k]
    return (x_fp8.astype(jnp.float32) * s).astype(out_dtype)
