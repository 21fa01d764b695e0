"""Building blocks shared by the DeepSeek modules: RMSNorm, Dense (FP8-capable), SwiGLU, rotary.

Weights are stored [out, in] ("NT", PyTorch `nn.Linear` and Hugging Face layout), so checkpoints and
`jax_ds.ops.fp8_linear` (w [N, K], 128x128 weight blocks) take them as they are. With
cfg.fp8_weights a weight is held as float8_e4m3fn plus a `WeightScale` [ceil(N/128), ceil(K/128)]
(w ~= w_fp8 * scale per 128x128 block: the `weight_scale_inv` of DeepSeek's FP8 release).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ds.models.config import DeepSeekConfig, YarnConfig

FP8_BLOCK = 128


class WeightScale(nnx.Variable):
    """Float32 block scales of an FP8 weight. Not an `nnx.Param`: optimizers and grads skip it."""


def init_weight(rngs: nnx.Rngs, shape, cfg: DeepSeekConfig, sharding=None) -> nnx.Param:
    """A normal(0, cfg.init_std) parameter, optionally annotated with mesh axis names."""
    value = cfg.init_std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape,
                                                       cfg.weight_dtype)
    if sharding is None:
        return nnx.Param(value)
    # Placement happens later (parallel.mesh.shard_model), so the model builds without a mesh.
    return nnx.Param(value, out_sharding=sharding, eager_sharding=False)


def init_fp8_weight(rngs: nnx.Rngs, shape, cfg: DeepSeekConfig, sharding=None):
    """`init_weight` quantized per 128x128 block: (nnx.Param e4m3 [..., N, K], WeightScale f32
    [..., ceil(N/128), ceil(K/128)]). A checkpoint loader overwrites both."""
    from jax_ds.ops import quantize_fp8

    w_fp8, scale = quantize_fp8(init_weight(rngs, shape, cfg)[...], block=(FP8_BLOCK, FP8_BLOCK))
    if sharding is None:
        return nnx.Param(w_fp8), WeightScale(scale)
    return (nnx.Param(w_fp8, out_sharding=sharding, eager_sharding=False),
            WeightScale(scale, out_sharding=sharding, eager_sharding=False))


def fp8_weight_linear(x, w_fp8_NK, scale):
    """y = x @ (w_fp8 * scale)^T for a weight held in FP8: x is quantized per (1, 128) on the fly
    and the product is `jax_ds.ops.fp8_gemm`, as DeepSeek-V3 serves its FP8 checkpoint.

    Args:
      x: bf16 / f32 [..., K]; K is zero-padded to a multiple of 128 (exact).
      w_fp8_NK: float8_e4m3fn [N, K]; scale: float32 [ceil(N/128), ceil(K/128)].

    Returns:
      x.dtype [..., N]. Inference only: no gradient flows to the weight.
    """
    from jax_ds.ops import fp8_gemm, quantize_fp8
    from jax_ds.ops._checks import gemm_out_dtype, pad_to

    k, n = x.shape[-1], w_fp8_NK.shape[0]
    x_MK = pad_to(x.reshape(-1, k), 1, FP8_BLOCK)
    x_fp8, x_scale = quantize_fp8(x_MK, block=(1, FP8_BLOCK))
    y = fp8_gemm(x_fp8, x_scale, pad_to(w_fp8_NK, 1, FP8_BLOCK), scale,
                 out_dtype=gemm_out_dtype(x.dtype))
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale in float32; eps is cfg.norm_eps unless given."""

    def __init__(self, dim: int, cfg: DeepSeekConfig, eps: float | None = None):
        self.eps = cfg.norm_eps if eps is None else eps
        self.scale = nnx.Param(jnp.ones((dim,), cfg.weight_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Dense(nnx.Module):
    """y = x @ w^T with w [out, in]; through FP8 (`jax_ds.ops.fp8_linear`) when cfg.fp8 is on.

    FP8 is used only when in_features is a multiple of 128: smaller or unaligned reductions (the
    kv latent of the tiny config, say) would mostly multiply padding, so they stay in
    cfg.dtype, as DeepSeek-V3 keeps its small GEMMs in BF16. With cfg.fp8_weights the weight
    itself is FP8 (`kernel` e4m3 + `kernel_scale`) and every product goes through
    `fp8_weight_linear`, whatever the alignment.
    """

    def __init__(self, in_features: int, out_features: int, cfg: DeepSeekConfig, *,
                 rngs: nnx.Rngs):
        if cfg.fp8_weights:
            self.kernel, self.kernel_scale = init_fp8_weight(rngs, (out_features, in_features),
                                                             cfg)
        else:
            self.kernel, self.kernel_scale = init_weight(rngs, (out_features, in_features),
                                                         cfg), None
        self.fp8 = cfg.fp8 and in_features % FP8_BLOCK == 0

    def __call__(self, x):
        w_NK = self.kernel[...]
        if self.kernel_scale is not None:
            return fp8_weight_linear(x, w_NK, self.kernel_scale[...])
        if self.fp8:
            from jax_ds.ops import fp8_linear

            return fp8_linear(x, w_NK.astype(x.dtype))
        return jnp.einsum("...K,NK->...N", x, w_NK.astype(x.dtype))


class MLP(nnx.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, d_model: int, hidden: int, cfg: DeepSeekConfig, *, rngs: nnx.Rngs):
        self.gate = Dense(d_model, hidden, cfg, rngs=rngs)
        self.up = Dense(d_model, hidden, cfg, rngs=rngs)
        self.down = Dense(hidden, d_model, cfg, rngs=rngs)

    def __call__(self, x_BTD):
        return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


# ----------------------------------------------------------------------------- rotary + YaRN


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature factor sqrt(1/t) = 0.1 mscale ln(s) + 1 (1 without stretch)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(dim: int, theta: float, yarn: YarnConfig | None = None) -> jax.Array:
    """Rotary angular frequencies [dim/2] float32, with YaRN's "NTK-by-parts" stretch if given.

    theta_i = theta^(-2i/dim). YaRN keeps frequencies that turn more than beta_fast times over the
    original context (they encode local order and never saw longer spans as out of range),
    divides by the factor those that turn fewer than beta_slow times, and blends linearly in the
    pair index between the two.
    """
    half = dim // 2
    freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / dim))
    if yarn is None or yarn.factor <= 1.0:
        return freq

    def pair_index(rotations: float) -> float:
        # i such that the original length L holds `rotations` full turns of theta_i:
        # L * theta^(-2i/dim) = 2 pi rotations  =>  i = dim ln(L / (2 pi rotations)) / (2 ln theta)
        return dim * math.log(yarn.original_max_len / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = pair_index(yarn.beta_fast), pair_index(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    # Bounds as DeepSeek's code and Hugging Face's clip them: the upper one to dim - 1 (not to the
    # last pair index half - 1: for small theta the ramp then ends past the last pair).
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a step, not a division by zero
    ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1: high frequency, kept; 0: low frequency, interpolated
    return freq / yarn.factor * (1.0 - keep) + freq * keep


def rope_amplitude(yarn: YarnConfig | None) -> float:
    """Scale of cos/sin: YaRN puts its temperature on the rotary part as mscale / mscale_all_dim
    (or as yarn.attention_factor when given, as a checkpoint's rope_scaling may)."""
    if yarn is None:
        return 1.0
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)


def attention_scale(cfg: DeepSeekConfig) -> float:
    """Softmax scale: 1/sqrt(qk_head_dim), times YaRN's temperature squared (q and k each)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn is not None:
        scale *= yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim) ** 2
    return scale


def apply_rope(x_BTHR, positions_BT, inv_freq_R, amplitude: float = 1.0):
    """Rotates consecutive pairs (x[2i], x[2i+1]) by positions * inv_freq[i].

    Interleaved pairs, as DeepSeek's released inference code (complex view of the last axis).
    Hugging Face's DeepSeek-V3 (rope_interleave) rotates the same pairs and writes them out
    de-interleaved (evens, then odds); q and k are permuted alike, so q.k and the model agree.

    Args:
      x_BTHR: [B, T, H, R] (R even).
      positions_BT: [B, T] int positions.
      inv_freq_R: [R/2] float32 from `rope_inv_freq`.
      amplitude: `rope_amplitude`.

    Returns:
      x's shape and dtype.
    """
    angle_BTR = positions_BT[..., None].astype(jnp.float32) * inv_freq_R
    cos = (amplitude * jnp.cos(angle_BTR))[:, :, None, :]
    sin = (amplitude * jnp.sin(angle_BTR))[:, :, None, :]
    pairs = x_BTHR.astype(jnp.float32).reshape(*x_BTHR.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x_BTHR.shape).astype(x_BTHR.dtype)
