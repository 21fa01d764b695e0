"""Multi-head Latent Attention (DeepSeek-V2 sec. 2.1), the training/prefill path.

Keys and values come from one low-rank latent c_kv [kv_lora_rank] per token (what a decode cache
stores), up-projected per head; queries go through their own low-rank bottleneck. Rotary position
lives in a separate qk_rope_dim slice ("decoupled RoPE"), one key slice shared by all heads, so the
latent itself stays position-free and can be absorbed into the projections at decode time.

Attention runs through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU). That API
wants one head dim for q, k and v, while MLA has d_qk = qk_nope + qk_rope (192 in V3) and d_v =
v_head_dim (128): V is zero-padded to d_qk and the output sliced back, which is exact because the
padded columns are sums of zeros (q and k are padded instead where d_v is the wider).
`attention_reference` is the plain-einsum oracle for that claim.

`MLAttention.decode` is the inference path over a paged cache (`jax_ds.models.kv_cache`) with
weight absorption (V2 sec. 2.1.4): W_UK is folded into the query (q_nope W_UK: one kv_lora_rank
latent query per head), every head attends to the cached [c_kv ; k_rope] rows through
`jax_ds.ops.mla_decode` (keys = the whole row, values = c_kv), and W_UV is applied to the latent
output. Keys and values are never up-projected; the cache holds kv_lora_rank + qk_rope_dim per
token and layer (576 in V2/V3).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ds.models import kv_cache
from jax_ds.models.config import DeepSeekConfig
from jax_ds.models.layers import (Dense, RMSNorm, apply_rope, attention_scale, rope_amplitude,
                                  rope_inv_freq)

log = logging.getLogger(__name__)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# The latent norms (q_a_layernorm, kv_a_layernorm) keep RMSNorm's default eps in DeepSeek's code
# and in Hugging Face's, whatever the config's rms_norm_eps (which only the block norms use).
LATENT_NORM_EPS = 1e-6


def attention_reference(q_BTHK, k_BSHK, v_BSHV, scale: float):
    """Causal softmax attention in float32 with plain einsums; any head dims.

    Returns [B, T, H, V] in q's dtype.
    """
    logits_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q_BTHK.astype(jnp.float32),
                             k_BSHK.astype(jnp.float32)) * scale
    t, s = q_BTHK.shape[1], k_BSHK.shape[1]
    causal_TS = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    logits_BHTS = jnp.where(causal_TS, logits_BHTS, -jnp.inf)
    probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1)
    out = jnp.einsum("BHTS,BSHV->BTHV", probs_BHTS, v_BSHV.astype(jnp.float32))
    return out.astype(q_BTHK.dtype)


def _implementation(dtype) -> str:
    """cuDNN flash attention on a CUDA GPU for 16-bit inputs; XLA's fused attention elsewhere."""
    if jax.default_backend() == "gpu" and dtype in _CUDNN_DTYPES:
        return "cudnn"
    return "xla"


def attend(q_BTHK, k_BSHK, v_BSHV, scale: float):
    """Causal attention via `jax.nn.dot_product_attention`, the head dims zero-padded to one.

    V is padded to the q/k head dim (output sliced back), or q and k to V's when V is wider
    (their dot products are unchanged; the scale is explicit).

    Args:
      q_BTHK, k_BSHK: queries and keys, head dim K.
      v_BSHV: values, head dim V.
      scale: softmax scale.

    Returns:
      [B, T, H, V] in q's dtype; equals `attention_reference`.
    """
    kdim, vdim = q_BTHK.shape[-1], v_BSHV.shape[-1]
    width = max(kdim, vdim)

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])))

    q_BTHK, k_BSHK, v_pad = pad(q_BTHK), pad(k_BSHK), pad(v_BSHV)
    impl = _implementation(q_BTHK.dtype)
    try:
        out = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_pad, scale=scale, is_causal=True,
                                           implementation=impl)
    except Exception as err:  # cuDNN rejects some shapes/versions at trace time; say so once
        if impl != "cudnn":
            raise
        if not getattr(attend, "_told", False):
            attend._told = True
            log.warning("cuDNN attention unavailable (%s); using XLA attention", err)
        out = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_pad, scale=scale, is_causal=True,
                                           implementation="xla")
    return out[..., :vdim]


class MLAttention(nnx.Module):
    """MLA: q = W_qb RMSNorm(W_qa x), [k_nope; v] = W_kvb RMSNorm(c_kv), k_rope shared by heads."""

    def __init__(self, cfg: DeepSeekConfig, *, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.num_heads
        self.num_heads = h
        self.nope, self.rope, self.vdim = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        if cfg.q_lora_rank:
            self.wq_a = Dense(d, cfg.q_lora_rank, cfg, rngs=rngs)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg, eps=LATENT_NORM_EPS)
            self.wq_b = Dense(cfg.q_lora_rank, h * cfg.qk_head_dim, cfg, rngs=rngs)
        else:  # V2-Lite: queries straight from x
            self.wq = Dense(d, h * cfg.qk_head_dim, cfg, rngs=rngs)
        # One projection makes the latent and the shared rotary key slice (MQA-style).
        self.wkv_a = Dense(d, cfg.kv_lora_rank + cfg.qk_rope_dim, cfg, rngs=rngs)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg, eps=LATENT_NORM_EPS)
        self.wkv_b = Dense(cfg.kv_lora_rank, h * (cfg.qk_nope_dim + cfg.v_head_dim), cfg,
                           rngs=rngs)
        self.wo = Dense(h * cfg.v_head_dim, d, cfg, rngs=rngs)
        self.scale = attention_scale(cfg)
        self.amplitude = rope_amplitude(cfg.yarn)
        self.rope_theta, self.yarn = cfg.rope_theta, cfg.yarn
        self.q_lora = bool(cfg.q_lora_rank)

    def __call__(self, x_BTD, positions_BT):
        """x [B, T, D], positions [B, T] int -> [B, T, D] (causal self-attention)."""
        b, t, _ = x_BTD.shape
        h = self.num_heads
        q = self.wq_b(self.q_norm(self.wq_a(x_BTD))) if self.q_lora else self.wq(x_BTD)
        q_BTHK = q.reshape(b, t, h, self.nope + self.rope)
        kv_a = self.wkv_a(x_BTD)
        c_kv_BTC, k_rope_BTR = kv_a[..., :self.kv_rank], kv_a[..., self.kv_rank:]
        kv_BTHX = self.wkv_b(self.kv_norm(c_kv_BTC)).reshape(b, t, h, self.nope + self.vdim)
        k_nope_BTHN, v_BTHV = kv_BTHX[..., :self.nope], kv_BTHX[..., self.nope:]

        inv_freq = rope_inv_freq(self.rope, self.rope_theta, self.yarn)
        q_rope_BTHR = apply_rope(q_BTHK[..., self.nope:], positions_BT, inv_freq, self.amplitude)
        k_rope_BT1R = apply_rope(k_rope_BTR[:, :, None, :], positions_BT, inv_freq,
                                 self.amplitude)
        q_BTHK = jnp.concatenate([q_BTHK[..., :self.nope], q_rope_BTHR], axis=-1)
        k_BTHK = jnp.concatenate(
            [k_nope_BTHN, jnp.broadcast_to(k_rope_BT1R, (b, t, h, self.rope))], axis=-1)
        out_BTHV = attend(q_BTHK, k_BTHK, v_BTHV, self.scale)
        return self.wo(out_BTHV.reshape(b, t, h * self.vdim))

    def absorbed_weights(self):
        """(W_UK [H, nope, C], W_UV [H, V, C]): wkv_b split per head (C = kv_lora_rank), in the
        weight's dtype (bf16 weights stay bf16: the absorption einsums accumulate in float32
        without a float32 copy of the weight per decode step; FP8 weights are dequantized to
        bf16: a 2^-9 relative rounding on top of e4m3's own 2^-4).

        k_nope = W_UK c_kv and v = W_UV c_kv, so q_nope.k_nope = (W_UK^T q_nope).c_kv and
        sum_j p_j v_j = W_UV (sum_j p_j c_kv_j).
        """
        w = self.wkv_b.kernel[...]
        if self.wkv_b.kernel_scale is not None:  # FP8 checkpoint: e4m3 + 128x128 block scales
            from jax_ds.ops import dequantize_fp8

            w = dequantize_fp8(w, self.wkv_b.kernel_scale[...], block=(128, 128),
                               out_dtype=jnp.bfloat16)
        w_HXC = w.reshape(self.num_heads, self.nope + self.vdim, self.kv_rank)
        return w_HXC[:, :self.nope], w_HXC[:, self.nope:]

    def decode(self, x_BTD, positions_BT, cache: kv_cache.PagedKVCache, layer: int, seqs_B):
        """Attention for T new tokens of sequences `seqs_B` over their cached prefix.

        Writes this layer's rows [c_kv ; k_rope] of the new tokens into `cache` (blocks reserved
        beforehand, lengths committed afterwards: see `Transformer.decode`) and attends, causally
        among the new tokens, through the absorbed weights.

        Args:
          x_BTD: [B, T, D] normed hidden states of the new tokens.
          positions_BT: [B, T] their positions (= the cached lengths + 0..T-1).
          cache: the model's paged cache; layer: this layer's index in it.
          seqs_B: [B] int32 cache slots of the sequences.

        Returns:
          ([B, T, D], cache with the rows written).
        """
        b, t, _ = x_BTD.shape
        h = self.num_heads
        q = self.wq_b(self.q_norm(self.wq_a(x_BTD))) if self.q_lora else self.wq(x_BTD)
        q_BTHK = q.reshape(b, t, h, self.nope + self.rope)
        kv_a = self.wkv_a(x_BTD)
        c_kv_BTC = self.kv_norm(kv_a[..., :self.kv_rank])
        inv_freq = rope_inv_freq(self.rope, self.rope_theta, self.yarn)
        k_rope_BTR = apply_rope(kv_a[..., None, self.kv_rank:], positions_BT, inv_freq,
                                self.amplitude)[:, :, 0]
        q_rope_BTHR = apply_rope(q_BTHK[..., self.nope:], positions_BT, inv_freq, self.amplitude)
        cache = kv_cache.write(cache, layer, seqs_B,
                               jnp.concatenate([c_kv_BTC, k_rope_BTR], axis=-1))

        w_uk_HNC, w_uv_HVC = self.absorbed_weights()
        q_lat_BTHC = _einsum_f32("BTHN,HNC->BTHC",
                                 q_BTHK[..., :self.nope].astype(w_uk_HNC.dtype), w_uk_HNC)
        q_BTHD = jnp.concatenate([q_lat_BTHC, q_rope_BTHR.astype(jnp.float32)], axis=-1)
        # an FP8 cache (uint8 rows) is read with bf16 queries
        q_dtype = jnp.bfloat16 if cache.fp8 else cache.kv.dtype
        # A step past the slot's rows (SEQ_TOO_LONG or OUT_OF_BLOCKS, flagged by reserve; those
        # rows were dropped) attends over the rows its blocks hold, eagerly and under jit alike:
        # never over a -1 table entry, which mla_decode would refuse eagerly and clamp to another
        # sequence's block when traced.
        table_BM = cache.block_table[seqs_B]
        seqlens_B = jnp.minimum(cache.lengths[seqs_B] + t, kv_cache.held_rows(cache, seqs_B))
        out_BTHC = paged_attention(q_BTHD.astype(q_dtype), cache.kv[layer], table_BM, seqlens_B,
                                   self.scale, self.kv_rank)
        out_BTHV = _einsum_f32("BTHC,HVC->BTHV", out_BTHC.astype(w_uv_HVC.dtype), w_uv_HVC)
        return self.wo(out_BTHV.astype(x_BTD.dtype).reshape(b, t, h * self.vdim)), cache


def _einsum_f32(spec, a, b):
    """einsum with float32 accumulation and result. XLA:CPU has no batched bf16 x bf16 -> f32 dot
    (its DotThunk refuses it), so on CPU the operands are widened first: exact, since a product
    of two bf16 values fits in float32. Elsewhere they stay narrow (the tensor cores' inputs)."""
    if jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def paged_attention(q_BTHD, kv_NPKD, block_table_BM, seqlens_B, scale: float, head_dim_v: int):
    """`mla_decode` (kernel when available) for V2/V3's 576 = 512 + 64 rows in 64-row blocks;
    `mla_decode_reference` for other widths (the tiny configs). Returns out [B, T, H, head_dim_v].
    """
    from jax_ds.ops import mla as mla_ops

    kernel_shape = (q_BTHD.shape[-1] == mla_ops.HEAD_DIM_QK and head_dim_v == mla_ops.HEAD_DIM_V
                    and kv_NPKD.shape[1] == mla_ops.BLOCK_SIZE)
    fn = mla_ops.mla_decode if kernel_shape else mla_ops.mla_decode_reference
    out, _ = fn(q_BTHD, kv_NPKD, block_table_BM, seqlens_B.astype(jnp.int32),
                softmax_scale=scale, causal=True, head_dim_v=head_dim_v)
    return out
