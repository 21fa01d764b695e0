"""MLA decode over a paged KV cache (FlashMLA semantics), and its pure-JAX reference.

With weight absorption (DeepSeek-V2 sec. 2.1.4) every query head attends to one shared cached row
per token: [c_kv (512 latent) ; k_rope (64)] = 576 columns. Keys are the whole row, values its
first head_dim_v = 512 columns, so one head dim d_qk = 576 and one KV head serve all Hq query
heads. The cache is paged: kv_cache [num_blocks, 64, 1, 576] holds 64-row blocks, and row t of
sequence b lives at kv_cache[block_table[b, t // 64], t % 64].

Conventions (the reference and the kernel share them; the tests pin them):
  softmax_scale  None means 1/sqrt(d_qk) = 1/sqrt(576), FlashMLA's default. A model passes its own
                 scale (DeepSeek: 1/sqrt(qk_nope + qk_rope) = 1/sqrt(192), times YaRN's mscale^2),
                 since the absorbed head dim is not the model's.
  lse            natural log of the softmax denominator of the scaled scores,
                 lse = log(sum_j exp(scale * q.k_j)), laid out [B, Hq, Sq] in float32.
  causal, Sq > 1 query i (0-based) of Sq (MTP drafts) sees keys < seqlen - (Sq - 1 - i);
                 causal=False: every query sees keys < seqlen.
  empty rows     a query that sees no key (seqlen 0, or causal with seqlen <= Sq - 1 - i) gets
                 out = 0 and lse = +inf, FlashMLA's convention (its kernel and its reference,
                 tests/test_flash_mla_dense_decoding.py; the log of the empty sum would be -inf;
                 before 2026-12-05 -inf here). The kernel writes it in its final lse store.
  unused rows    cache rows at or past a sequence's length are never read into the result (they
                 may hold anything, NaN included).
  NaN in a row   a query that sees a NaN cache row gets NaN out and lse, as in FlashMLA (before
                 2026-12-05 both gave out = 0 and lse = -inf for a part that saw it, and the
                 kernel merged a split batch's other parts past it). A NaN in a value column
                 (< 512) of a row inside the length that a causal query does not see (one of the
                 last Sq - 1) still reaches that query's out, not its lse: P V multiplies the
                 row's zero weight by it (0 * NaN), as in FlashMLA.
  precision      the kernel rounds P to bf16 for P V, as FlashMLA does; for sequences of at most
                 1024 keys it adds a second pass with P's rounding residual (few keys do not
                 average the 2^-9 error out). S, the softmax, lse and O accumulate in float32.
                 Where attention is peaked and the values are large next to an output element,
                 the one-pass error is bounded by 2^-9 sum_j p_j |v_j| rather than by the
                 output's own size (FlashMLA's elementwise bound can then fail, on FlashMLA too;
                 tests/test_mla_decode_gpu.py::test_kernel_growing_scores).
  clamping       (traced values cannot be checked in Python) block_table entries are clamped into
                 [0, num_blocks - 1]; cache_seqlens into [0, max_blocks * 64]. Concrete (non-traced)
                 cache_seqlens above max_blocks * 64 or below 0 are rejected with a ValueError, and
                 so are, when both are concrete, block_table entries outside [0, num_blocks) among
                 the ceil(seqlen / 64) a sequence uses (the rest may hold anything, -1 say).

FP8 cache (FlashMLA's FP8 layout, 656 bytes a token): kv_cache uint8 [num_blocks, 64, 1, 656]
(or the same bytes typed float8_e4m3fn, as FlashMLA's own tensors are),
each row [512 e4m3 latent values | 4 float32 scales, one per 128 latent values | 64 bf16 rope
values] (`quantize_kv_fp8`, `dequantize_kv_fp8`). A scale is 2 ** ceil(log2(max(amax / 448,
1e-4))) over its 128 values (a power of two: the e4m3 value times it is exact in bf16, so a row
dequantizes to bf16 without rounding); the rope part is kept in bf16. mla_decode takes such a
cache with bf16 q and computes exactly what it computes on the dequantized bf16 cache. Today
only the reference reads it (impl="auto" says so once, "ffi" raises); the layout is the one a
kernel would stream (a 64-row block is 41984 contiguous bytes, 41 x 1024).

Kernel (ffi/mla/mla_decode.cu, impl="ffi"): bf16, Hq in [16, 128]; the batch's KV blocks are
split over one wave of persistent CTAs (per-batch cost = blocks + FIXED_COST; each CTA plans its
own share from the lengths), the decode kernel streams 64-row blocks by TMA into WGMMA (64 query
rows = heads x Sq per CTA), a combine kernel merges split batches. Notes and numbers:
benchmarks/NOTES-mla.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi
from jax_ds.ops._checks import (FP8_MAX, cdiv, check_dtype, check_ndim, check_shape, concrete,
                                is_int)
from jax_ds.ops.quant import _pow2_ceil

TARGET = "jax_ds_mla_decode"
_ffi.declare_op("mla_decode", TARGET)

BLOCK_SIZE = 64  # rows per cache block (FlashMLA's page size)
HEAD_DIM_QK = 576  # kv_lora_rank 512 + qk_rope_dim 64
HEAD_DIM_V = 512  # V = the latent part of each cached row
KERNEL_HEADS = (16, 128)  # Hq range the kernel takes (inclusive); the reference takes any Hq
KERNEL_DTYPES = (jnp.bfloat16,)
REFERENCE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# The reference gathers this many cache bytes (as float32) per scan step at most.
_CHUNK_BYTES = 32 << 20
# FlashMLA's FP8 cache row: 512 e4m3 latent values, 4 float32 scales (one per 128), 64 bf16 rope.
FP8_TILE = 128
FP8_ROW_BYTES = (HEAD_DIM_V + 4 * (HEAD_DIM_V // FP8_TILE) + 2 * (HEAD_DIM_QK - HEAD_DIM_V))
_FP8_SCALE_MIN = np.float32(1e-4)  # the smallest scale before the power-of-two rounding


def quantize_kv_fp8(rows):
    """Cache rows [..., 576] (c_kv 512 ; k_rope 64; any float dtype) -> uint8 [..., 656] in
    FlashMLA's FP8 layout: bytes [0, 512) the latent in e4m3, [512, 528) four float32 scales
    (little-endian; scale t covers latent values [128 t, 128 t + 128)), [528, 656) k_rope in bf16.

    scale_t = 2 ** ceil(log2(max(amax_t / 448, 1e-4))), amax_t the largest |value| of the 128
    (in float32; the power of two is taken from the bits, exactly), and the latent value
    x -> e4m3(x / scale_t), round to nearest even (|x / scale_t| <= 448, so nothing saturates). A
    tile of zeros gets 2 ** -13. Non-finite values are not supported: NaN or Inf in a tile makes
    its scale and so its values NaN or 0 (FlashMLA's reference does the same). Not
    `quantize_fp8(..., scale_format="ue8m0")`: that one floors amax (1e-4) where FlashMLA floors
    amax / 448, and multiplies by float32(1/448) where FlashMLA divides.
    """
    rows = jnp.asarray(rows)
    if rows.ndim < 1 or rows.shape[-1] != HEAD_DIM_QK:
        raise ValueError(f"quantize_kv_fp8: rows must be [..., {HEAD_DIM_QK}] (c_kv "
                         f"{HEAD_DIM_V} ; k_rope {HEAD_DIM_QK - HEAD_DIM_V}), got shape "
                         f"{tuple(rows.shape)}")
    if not jnp.issubdtype(rows.dtype, jnp.floating):
        raise TypeError(f"quantize_kv_fp8: rows must be floating point, got {rows.dtype}")
    return _quantize_kv_fp8(rows)


@jax.jit
def _quantize_kv_fp8(rows):
    lead = rows.shape[:-1]
    tiles = HEAD_DIM_V // FP8_TILE
    lat = rows[..., :HEAD_DIM_V].astype(jnp.float32).reshape(*lead, tiles, FP8_TILE)
    amax = jnp.abs(lat).max(-1)
    # amax / 448 divided (not times 1/448): an amax of 448 * 2^k gives exactly 2^k
    scale, inv = _pow2_ceil(jnp.maximum(amax / np.float32(FP8_MAX), _FP8_SCALE_MIN))
    q = (lat * inv[..., None]).astype(jnp.float8_e4m3fn).reshape(*lead, HEAD_DIM_V)
    to_bytes = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*lead, -1)
    rope = rows[..., HEAD_DIM_V:].astype(jnp.bfloat16)
    return jnp.concatenate([to_bytes(q), to_bytes(scale), to_bytes(rope)], axis=-1)


def dequantize_kv_fp8(packed, dtype=jnp.bfloat16):
    """uint8 [..., 656] (`quantize_kv_fp8`'s layout; the same bytes typed float8_e4m3fn are
    taken too) -> [..., 576] in `dtype` (bfloat16 or float32; exact in either: e4m3 times a
    power of two fits bf16)."""
    packed = jnp.asarray(packed)
    if not is_fp8_cache(packed) or packed.ndim < 1 or packed.shape[-1] != FP8_ROW_BYTES:
        raise ValueError(f"dequantize_kv_fp8: expected uint8 [..., {FP8_ROW_BYTES}], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    # Only these hold every e4m3 value times a power-of-two scale exactly (an int dtype
    # truncated them silently, float16's range is too narrow for large scales).
    if np.dtype(dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float32)):
        raise TypeError(f"dequantize_kv_fp8: dtype must be bfloat16 or float32, got "
                        f"{np.dtype(dtype).name}")
    return _dequantize_kv_fp8(packed, np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_kv_fp8(packed, dtype):
    packed = jax.lax.bitcast_convert_type(packed, jnp.uint8)  # (FlashMLA types them e4m3)
    lead = packed.shape[:-1]
    tiles = HEAD_DIM_V // FP8_TILE
    lat = jax.lax.bitcast_convert_type(packed[..., :HEAD_DIM_V], jnp.float8_e4m3fn)
    end = HEAD_DIM_V + 4 * tiles
    scale = jax.lax.bitcast_convert_type(packed[..., HEAD_DIM_V:end].reshape(*lead, tiles, 4),
                                         jnp.float32)
    rope = jax.lax.bitcast_convert_type(packed[..., end:].reshape(*lead, -1, 2), jnp.bfloat16)
    lat = (lat.astype(jnp.float32).reshape(*lead, tiles, FP8_TILE) * scale[..., None])
    return jnp.concatenate([lat.reshape(*lead, HEAD_DIM_V).astype(dtype), rope.astype(dtype)],
                           axis=-1)


def is_fp8_cache(kv_cache) -> bool:
    """Whether kv_cache holds FP8 rows (656 bytes: uint8, or float8_e4m3fn as FlashMLA types
    them) rather than float rows."""
    return np.dtype(kv_cache.dtype) in (np.dtype(np.uint8), np.dtype(jnp.float8_e4m3fn))


def _check_common(op, q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v,
                  causal):
    """Shapes, dtypes and static ranges any MLA decode needs; returns (B, Sq, Hq, D, page)."""
    check_ndim(op, "q", q, 4, "[B, Sq, Hq, d_qk]")
    check_ndim(op, "kv_cache", kv_cache, 4, "[num_blocks, block_size, 1, d_qk]")
    check_ndim(op, "block_table", block_table, 2, "[B, max_blocks]")
    check_ndim(op, "cache_seqlens", cache_seqlens, 1, "[B]")
    check_dtype(op, "q", q, REFERENCE_DTYPES)
    check_dtype(op, "kv_cache", kv_cache, REFERENCE_DTYPES + (jnp.uint8, jnp.float8_e4m3fn))
    check_dtype(op, "block_table", block_table, (jnp.int32,))
    check_dtype(op, "cache_seqlens", cache_seqlens, (jnp.int32,))
    b, sq, hq, d = q.shape
    fp8 = is_fp8_cache(kv_cache)
    if fp8:
        if np.dtype(q.dtype) != np.dtype(jnp.bfloat16) or d != HEAD_DIM_QK:
            raise TypeError(f"{op}: an FP8 cache (uint8 [..., {FP8_ROW_BYTES}]) takes bfloat16 q "
                            f"[..., {HEAD_DIM_QK}], got {np.dtype(q.dtype).name} q of shape "
                            f"{tuple(q.shape)}")
    elif np.dtype(q.dtype) != np.dtype(kv_cache.dtype):
        raise TypeError(f"{op}: q and kv_cache must share a dtype, got {np.dtype(q.dtype).name} "
                        f"and {np.dtype(kv_cache.dtype).name}")
    n, page, hkv, dk = kv_cache.shape
    if b < 1 or sq < 1 or hq < 1:
        raise ValueError(f"{op}: q has shape {tuple(q.shape)}, expected [B, Sq, Hq, d_qk] with "
                         f"B, Sq, Hq >= 1")
    if n < 1 or page < 1:
        raise ValueError(f"{op}: kv_cache has shape {tuple(kv_cache.shape)}, expected at least "
                         f"one block of at least one row")
    if fp8:
        check_shape(op, "kv_cache", kv_cache, (n, page, 1, FP8_ROW_BYTES),
                    f"[num_blocks, block_size, 1, {FP8_ROW_BYTES}] (an FP8 cache: uint8 rows)")
    else:
        check_shape(op, "kv_cache", kv_cache, (n, page, 1, d), "[num_blocks, block_size, 1, "
                    "d_qk] (one shared KV head, d_qk from q)")
    if block_table.shape[0] != b or block_table.shape[1] < 1:
        raise ValueError(f"{op}: block_table has shape {tuple(block_table.shape)}, expected "
                         f"({b}, max_blocks >= 1) = [B, max_blocks] (B from q)")
    check_shape(op, "cache_seqlens", cache_seqlens, (b,), "[B] (B from q)")
    if not is_int(head_dim_v) or not 1 <= head_dim_v <= d:
        raise ValueError(f"{op}: head_dim_v must be an int in [1, d_qk = {d}], got {head_dim_v!r}")
    if softmax_scale is not None:
        # A static number: the kernel takes it as an attribute (a traced scale cannot be one).
        if (isinstance(softmax_scale, (jax.core.Tracer, bool, str, bytes))
                or np.ndim(softmax_scale) != 0
                or not np.issubdtype(np.asarray(softmax_scale).dtype, np.number)):
            got = ("a traced value" if isinstance(softmax_scale, jax.core.Tracer)
                   else f"{type(softmax_scale).__name__} {softmax_scale!r}")
            raise TypeError(f"{op}: softmax_scale must be a static Python float (or None for "
                            f"1/sqrt(d_qk)), got {got}")
        if not (np.isfinite(float(softmax_scale)) and float(softmax_scale) > 0):
            raise ValueError(f"{op}: softmax_scale must be finite and > 0 (or None for "
                             f"1/sqrt(d_qk)), got {softmax_scale!r}")
    if not isinstance(causal, (bool, np.bool_)):  # None or 0.0 would drop the MTP mask quietly
        got = ("a traced value" if isinstance(causal, jax.core.Tracer)
               else f"{type(causal).__name__} {causal!r}")
        raise TypeError(f"{op}: causal must be a static Python bool (it picks the mask at trace "
                        f"time), got {got}")
    lens = concrete(cache_seqlens)  # None when traced: the kernel clamps them
    if lens is not None:
        cap = block_table.shape[1] * page
        if lens.size and (lens.max() > cap or lens.min() < 0):
            raise ValueError(f"{op}: cache_seqlens must lie in [0, max_blocks * block_size = "
                             f"{block_table.shape[1]} * {page} = {cap}], got min {lens.min()}, "
                             f"max {lens.max()}")
        table = concrete(block_table)  # the entries the lengths use must name blocks
        if table is not None:
            used = np.arange(table.shape[1])[None, :] < -(-lens[:, None] // page)
            bad = used & ((table < 0) | (table >= n))
            if bad.any():
                row, col = map(int, np.argwhere(bad)[0])
                raise ValueError(f"{op}: block_table[{row}, {col}] = {int(table[row, col])} lies "
                                 f"outside [0, num_blocks = {n}) and holds rows of sequence "
                                 f"{row} (cache_seqlens[{row}] = {int(lens[row])}); entries past "
                                 f"a sequence's length may hold anything")
    return b, sq, hq, d, page


def mla_decode_reference(q, kv_cache, block_table, cache_seqlens, *, softmax_scale=None,
                         causal=True, head_dim_v=HEAD_DIM_V):
    """Paged MLA decode in float32 math with an online softmax; the CPU path and the oracle.

    Any d_qk, head_dim_v <= d_qk, block size and Hq (the model's tiny configs use it directly);
    `mla_decode` pins the kernel's 576 / 512 / 64. The cache is read a chunk of blocks per step
    (a [B, chunk * block_size, d_qk] gather, never the whole [B, max_blocks * block_size, d_qk]),
    and only up to the longest sequence. Equivalent to the following JAX code:

      rows = kv_cache[clip(block_table, 0, N - 1)].reshape(B, max_blocks * bs, d).astype(f32)
      s = scale * einsum("BQHD,BSD->BQHS", q.astype(f32), rows)
      limit[b, i] = clip(seqlens[b], 0, max_blocks * bs) - (Sq - 1 - i if causal else 0)
      s = where(arange(S) < limit[:, :, None, None], s, -inf)
      lse = logsumexp(s, -1)                         # -inf where no key is seen
      out = where(lse > -inf, einsum("BQHS,BSV->BQHV", exp(s - lse), rows[..., :dv]), 0)
      lse = where(isneginf(lse), +inf, lse)          # FlashMLA's lse of a query with no key
      return out.astype(q.dtype), lse.transpose(0, 2, 1)

    Args/returns as `mla_decode` (out in q's dtype; lse float32 [B, Hq, Sq]).
    """
    _check_common("mla_decode_reference", q, kv_cache, block_table, cache_seqlens,
                  softmax_scale, head_dim_v, causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _reference(q, kv_cache, block_table, cache_seqlens, np.float32(scale), bool(causal),
                      int(head_dim_v), _chunk_blocks(q, kv_cache, block_table))


def _chunk_blocks(q, kv_cache, block_table) -> int:
    """Blocks per reference step: as many as fit _CHUNK_BYTES of float32 rows for the batch."""
    b, page, d, max_blocks = q.shape[0], kv_cache.shape[1], q.shape[3], block_table.shape[1]
    return int(max(1, min(max_blocks, _CHUNK_BYTES // (b * page * d * 4))))


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _reference(q, kv_cache, block_table, cache_seqlens, scale, causal, dv, chunk):
    b, sq, hq, d = q.shape
    n, page = kv_cache.shape[:2]
    max_blocks = block_table.shape[1]
    steps = cdiv(max_blocks, chunk)
    table = jnp.clip(block_table, 0, n - 1)
    table = jnp.pad(table, ((0, 0), (0, steps * chunk - max_blocks)))  # masked: past every limit
    lens_B = jnp.clip(cache_seqlens, 0, max_blocks * page)
    # Query i sees keys < limit[b, i].
    shift_Q = (sq - 1 - jnp.arange(sq)) if causal else jnp.zeros(sq, jnp.int32)
    limit_BQ = lens_B[:, None] - shift_Q[None, :]
    q32 = q.astype(jnp.float32) * scale  # scores come out scaled: lse is in their units
    width = chunk * page

    def step(c, carry):
        m_BQH, l_BQH, acc_BQHV = carry
        blocks_BC = jax.lax.dynamic_slice_in_dim(table, c * chunk, chunk, axis=1)
        pos_S = c * width + jnp.arange(width)
        rows = kv_cache[blocks_BC]
        if is_fp8_cache(kv_cache):
            rows = _dequantize_kv_fp8(rows, np.dtype(jnp.float32))
        rows_BSD = rows.reshape(b, width, d).astype(jnp.float32)
        # Rows past a sequence's end may hold anything (NaN in unused cache memory): zero them,
        # or 0 * NaN would reach the output through a masked probability.
        rows_BSD = jnp.where((pos_S[None, :] < lens_B[:, None])[..., None], rows_BSD, 0.0)
        s_BQHS = jnp.einsum("BQHD,BSD->BQHS", q32, rows_BSD,
                            precision=jax.lax.Precision.HIGHEST)
        seen_BQ1S = (pos_S[None, None, :] < limit_BQ[:, :, None])[:, :, None, :]
        s_BQHS = jnp.where(seen_BQ1S, s_BQHS, -jnp.inf)
        m_new = jnp.maximum(m_BQH, s_BQHS.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no key yet: keep exp() at 0, no NaN
        p_BQHS = jnp.exp(s_BQHS - m_safe[..., None])
        alpha = jnp.exp(m_BQH - m_safe)
        l_BQH = l_BQH * alpha + p_BQHS.sum(-1)
        acc_BQHV = acc_BQHV * alpha[..., None] + jnp.einsum(
            "BQHS,BSV->BQHV", p_BQHS, rows_BSD[..., :dv], precision=jax.lax.Precision.HIGHEST)
        return m_new, l_BQH, acc_BQHV

    init = (jnp.full((b, sq, hq), -jnp.inf, jnp.float32), jnp.zeros((b, sq, hq), jnp.float32),
            jnp.zeros((b, sq, hq, dv), jnp.float32))
    # Stop after the chunk holding the longest sequence's last row (a traced bound: a while loop).
    needed = (jnp.max(lens_B) + width - 1) // width
    m_BQH, l_BQH, acc_BQHV = jax.lax.fori_loop(0, needed, step, init)
    seen = l_BQH != 0  # 0: no key seen; NaN (a NaN in a row the query sees) propagates
    out = jnp.where(seen[..., None], acc_BQHV / jnp.where(seen, l_BQH, 1.0)[..., None], 0.0)
    lse_BQH = jnp.where(seen, m_BQH + jnp.log(jnp.where(seen, l_BQH, 1.0)), jnp.inf)
    return out.astype(q.dtype), lse_BQH.transpose(0, 2, 1)


# The planner's price of touching a batch, in 64-row KV blocks: a part pays it once per batch it
# reads (the Q tile load, the output or partial write). FlashMLA's balancing uses 5; on the H200 2
# was faster on average (+2.1% and +0.8% over 5, geometric mean over the bench mla shapes, in two
# sweeps of scripts/sweep_mla_plan.py; benchmarks/NOTES-mla.md).
FIXED_COST = 2

# A batch split into at most this many pieces is merged inside the decode kernel by the warpgroup
# that finishes its last piece, instead of by the separate combine kernel (same arithmetic, same
# bits); batches of more pieces (a few long sequences over many parts) keep the combine kernel,
# which spreads their merge over many CTAs. 0: every split batch goes to the combine kernel, and
# the decode kernel is the instance without the merge. 0 is the default: on the H200 it was faster
# than 4 on all 48 shapes of `bench mla` (geometric mean +3.4%, up to +11% at s_k 4096 with
# variable lengths; three runs against four, interleaved; benchmarks/NOTES-mla.md, nineteenth
# session).
FUSE_MAX_SPLITS = 0

# With equal lengths the plan cuts parts at batch ends (no batch split) when that lengthens a part
# by at most FIXED_COST blocks or by this share of it, in percent; taken for one query token per
# batch (Sq 1) with tiles of 64 query rows (Hq >= 64), whose split batches write 128 KB of f32
# partials a piece that the combine kernel reads back (~22 us after the decode grid at b128 s_k
# 4096 h128 on the H100). Measured on the H100 (2026-12-07, benchmarks/NOTES-mla.md), 8% against
# none at b128 h128: Sq1 s_k 4096 +4-6%, 8192 +0-6%; Sq2 (not taken) 4096 -1-2%, 8192 -1-3%.
ALIGN_SLACK_PCT = 8


def kernel_plan(sq, hq, num_sms=None):
    """The plan arguments `mla_decode` passes to `ffi_mla_decode` for Sq query tokens and Hq heads
    on a GPU of `num_sms` SMs (None: the default device's), as a dict: num_parts (parts per head
    tile of 64 query rows: one wave over the SMs), fixed_cost, fuse_max_splits and
    align_slack_pct (ALIGN_SLACK_PCT for Sq 1 with Hq >= 64, else 0). Scripts that time or sweep
    the plan start from it."""
    sms = _ffi.num_sms() if num_sms is None else num_sms
    return dict(num_parts=max(1, sms // cdiv(sq * hq, 64)), fixed_cost=FIXED_COST,
                fuse_max_splits=FUSE_MAX_SPLITS,
                align_slack_pct=ALIGN_SLACK_PCT if sq == 1 and hq >= 64 else 0)


def plan_payload(block_counts, num_parts, fixed_cost=FIXED_COST, align_slack_pct=0):
    """The kernel plan's part size on its cost line (PlanPart in ffi/mla/mla_decode.cu), in KV
    blocks, and the line's total: batch b costs its blocks plus `fixed_cost`; parts get
    ceil(total / num_parts) each, rounded up to whole batches when every batch has the same block
    count and that adds at most max(`fixed_cost`, `align_slack_pct` % of the part) (then no batch
    is split). For tests and scripts/model_mla_plan.py; the kernel computes it on the device."""
    nbs = np.asarray(block_counts, np.int64)
    total = int((nbs + fixed_cost).sum())
    payload = max(-(-total // num_parts), 1)
    if nbs.size and nbs.min() == nbs.max():
        cost = int(nbs[0]) + fixed_cost
        aligned = -(-payload // cost) * cost
        if aligned - payload <= max(fixed_cost, payload * align_slack_pct // 100):
            payload = aligned
    return payload, total


def mla_decode(q, kv_cache, block_table, cache_seqlens, *, softmax_scale=None, causal=True,
               head_dim_v=HEAD_DIM_V, impl="auto"):
    """Multi-head latent attention decode over a paged cache (FlashMLA's flash_mla_with_kvcache).

    Args:
      q: [B, Sq, Hq, 576] bfloat16 (float32 / float16 take the reference: "auto" says so once,
        "ffi" raises). Sq >= 1 (Sq > 1: MTP draft tokens); the kernel takes Hq in [16, 128].
      kv_cache: [num_blocks, 64, 1, 576], q's dtype: 64-row blocks of [c_kv (512); k_rope (64)];
        or an FP8 cache, uint8 [num_blocks, 64, 1, 656] (`quantize_kv_fp8`; q bfloat16; the
        reference reads it).
      block_table: int32 [B, max_blocks]: block_table[b, j] holds rows 64j..64j+63 of sequence b
        (entries outside [0, num_blocks) that a length uses: a ValueError when both are
        concrete, clamped when traced).
      cache_seqlens: int32 [B]: cached rows per sequence, in [0, max_blocks * 64] (clamped when
        traced, checked when concrete).
      softmax_scale: > 0; None means 1/sqrt(576).
      causal: with Sq > 1, query i sees keys < seqlen - (Sq - 1 - i); else all keys < seqlen.
      head_dim_v: 512 (V = the first 512 columns of each cached row).
      impl: "auto", "ffi" or "xla".

    Returns:
      (out [B, Sq, Hq, 512] in q's dtype, lse float32 [B, Hq, Sq]); rows that see no key are
      out = 0, lse = +inf (FlashMLA's convention).
    """
    op = "mla_decode"
    check_ndim(op, "q", q, 4, "[B, Sq, Hq, d_qk]")
    if q.shape[-1] != HEAD_DIM_QK:
        raise ValueError(f"{op}: q has shape {tuple(q.shape)}, expected last dim d_qk = "
                         f"{HEAD_DIM_QK} (512 latent + 64 rope); use mla_decode_reference for "
                         f"other head dims")
    check_ndim(op, "kv_cache", kv_cache, 4, "[num_blocks, block_size, 1, d_qk]")
    if kv_cache.shape[1] != BLOCK_SIZE:
        raise ValueError(f"{op}: kv_cache has shape {tuple(kv_cache.shape)}, expected block size "
                         f"{BLOCK_SIZE} in dim 1 = [num_blocks, {BLOCK_SIZE}, 1, {HEAD_DIM_QK}]")
    b, sq, hq, d, page = _check_common(op, q, kv_cache, block_table, cache_seqlens,
                                       softmax_scale, head_dim_v, causal)
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"{op}: head_dim_v must be {HEAD_DIM_V} (the latent width), got "
                         f"{head_dim_v!r}")
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    unsupported = None
    if is_fp8_cache(kv_cache):
        unsupported = "the kernel reads bfloat16 caches; an FP8 cache runs on the reference"
    elif np.dtype(q.dtype) not in [np.dtype(t) for t in KERNEL_DTYPES]:
        unsupported = f"the kernel takes bfloat16, got {np.dtype(q.dtype).name}"
    elif not KERNEL_HEADS[0] <= hq <= KERNEL_HEADS[1]:
        unsupported = f"the kernel takes Hq in [{KERNEL_HEADS[0]}, {KERNEL_HEADS[1]}], got {hq}"
    if _ffi.resolve_impl(op, TARGET, impl, unsupported) == "xla":
        return _reference(q, kv_cache, block_table, cache_seqlens, np.float32(scale),
                          bool(causal), HEAD_DIM_V, _chunk_blocks(q, kv_cache, block_table))
    return ffi_mla_decode(q, kv_cache, block_table, cache_seqlens, scale, causal,
                          **kernel_plan(sq, hq))


def ffi_mla_decode(q, kv_cache, block_table, cache_seqlens, scale, causal, num_parts,
                   fixed_cost, fuse_max_splits=FUSE_MAX_SPLITS, align_slack_pct=0,
                   workspace=False):
    """The kernel's custom call with an explicit plan (`num_parts` persistent parts per head tile,
    `fixed_cost` KV blocks charged per batch a part touches, in [1, 64]; split batches of at most
    `fuse_max_splits` pieces merged in the decode kernel, >= 0; equal lengths cut at batch ends
    when parts grow by at most `align_slack_pct` % of their size, in [0, 100]: `plan_payload`);
    no validation (tests, sweeps). Returns (out, lse), with `workspace` also the kernel's plan
    (int32 [2B]: the pieces of each batch, then their first partial slot) and its counters (int32
    [B, head tiles, 2]; written only by the fused merge)."""
    b, sq, hq, _ = q.shape
    rows = sq * hq  # query rows per batch (heads x Sq), 64 per CTA
    tiles = cdiv(rows, 64)
    # The trailing results are the kernel's workspace: the splits per batch and their first
    # partial slot; the partial outputs of batches split across parts (at most 2 per part) and
    # their lse (one copy per consumer warpgroup); per (batch, head tile, warpgroup) the pieces
    # finished (for the merge in the decode kernel).
    types = (jax.ShapeDtypeStruct((b, sq, hq, HEAD_DIM_V), q.dtype),
             jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
             jax.ShapeDtypeStruct((2 * b,), jnp.int32),
             jax.ShapeDtypeStruct((2 * num_parts * rows * HEAD_DIM_V,), jnp.float32),
             jax.ShapeDtypeStruct((2 * 2 * num_parts * rows,), jnp.float32),
             jax.ShapeDtypeStruct((2 * b * tiles,), jnp.int32))
    out, lse, plan, _, _, counters = _ffi.kernel_call(
        TARGET, types, q, kv_cache, block_table, cache_seqlens, softmax_scale=np.float32(scale),
        causal=bool(causal), num_parts=np.int32(num_parts), fixed_cost=np.int32(fixed_cost),
        fuse_max_splits=np.int32(fuse_max_splits), align_slack_pct=np.int32(align_slack_pct))
    if workspace:
        return out, lse, plan, counters.reshape(b, tiles, 2)
    return out, lse
